"""python -m jobs.bench.feature_probe [--backbone ARCH] [--weights W]: can this backbone's patch features teach
AnoPLe's decoder at all?

Diagnostic, not a test. AnoPLe's decoder reads a patch's anomaly from patch-text similarities: a linear
function of the (adapted, normalised) patch token. Whether that can work is a property of the frozen
backbone: this fits a linear probe (logistic regression, pure torch) per decoder/bank layer on the patch
tokens of synthetic products' normal shots with pseudo-anomalies pasted in (half of the views, the training
kinds), and prints its patch AUROC on held-out views. Near 0.5: the features do not linearly separate
anomalous patches, and no recipe will make the trained parts beat the memory bank (which compares each
patch with the product's own normal patches, a non-linear test); a pretrained CLIP is expected far above.
"""
from __future__ import annotations

import argparse
import sys
import tempfile

import torch
import torch.nn.functional as F

from jobs.bench.common import load_data
from pipeline.evaluation.metrics import auroc
from pipeline.fitting.prompts import make_views
from pipeline.fitting.shots import shot_batch, wants_detail
from pipeline.fitting.weights import build_model
from pipeline.model.config import AnoPLeConfig
from pipeline.sources.synthetic import make_mvtec_folder, product_names


def linear_probe_auroc(x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> float:
    """x [N, d] features, y [N] 0/1: logistic regression on the first half (class-balanced loss, L2), AUROC of
    its scores on the second half."""
    half = len(x) // 2
    mu, sd = x[:half].mean(0), x[:half].std(0) + 1e-6
    x = (x - mu) / sd  # standardised on the training half
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    pos = y[:half].float().mean().clamp(1e-3, 1 - 1e-3)
    weight = torch.where(y[:half] > 0, 0.5 / pos, 0.5 / (1 - pos))  # [half] balanced classes
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(x[:half] @ w + b, y[:half].float(), weight=weight)
                + 1e-3 * w.square().sum())
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return auroc((x[half:] @ w + b).numpy(), y[half:].numpy())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="jobs.bench.feature_probe", description=__doc__.split("\n\n")[1])
    ap.add_argument("--backbone", default="anople-small-vit")
    ap.add_argument("--weights", default="random")
    ap.add_argument("--products", type=int, default=3)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=8, help="pseudo-anomaly draws over the shots")
    ap.add_argument("--size", type=int, default=128, help="synthetic image size")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    products = list(product_names(args.products))
    cfg = AnoPLeConfig(seed=args.seed, pseudo_prob=1.0, multiscale=False, pseudo_latent=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as root:
        make_mvtec_folder(root + "/src", tuple(products), n_train=args.shots + 1, n_test_good=1, n_test_defect=1,
                          size=args.size, seed=100 + args.seed)
        data, _ = load_data(root, products, args.shots, args.seed)
        model = build_model(args.backbone, args.weights, args.seed, cfg, device)
        shots = shot_batch(data, products, model.image_size, wants_detail(model))
    gen = torch.Generator().manual_seed(args.seed)
    # the decoder's tokens (v-v path by default) and the bank's (frozen CLIP by default), each layer under its role
    layers = [("decoder", l) for l in model.decoder_layers] + [("bank", l) for l in model.bank_layers]
    feats: dict[tuple, list[torch.Tensor]] = {k: [] for k in layers}
    labels = []
    with torch.no_grad():
        for _ in range(args.rounds):
            v = make_views(model, shots, gen)  # every view has a pixel pseudo-anomaly of a training kind
            enc = model.encode_image(v.x.to(device))
            frac = F.adaptive_avg_pool2d(v.mask[:, None], model.grid)[:, 0].flatten(1)  # [V, HW] share anomalous
            labels.append((frac > 0.5).flatten())
            for role, l in layers:
                tokens = (enc.patches if role == "decoder" else enc.bank)[l]  # [V, HW, d]
                feats[(role, l)].append(model.clip.visual.ln_post(tokens).flatten(0, 1).float().cpu())  # [V*HW, d]
    y = torch.cat(labels).long()
    print(f"backbone {args.backbone} ({args.weights}), {len(products)} products x {args.shots} shots, "
          f"{len(y)} patches ({100 * y.float().mean():.1f}% anomalous), device {device}")
    for role, l in layers:
        print(f"  layer {l:>2} ({role}): linear-probe patch AUROC on held-out views "
              f"{linear_probe_auroc(torch.cat(feats[(role, l)]), y):.3f}")
    print("(0.5 = chance: the decoder cannot learn from these features; the memory bank does not need them to be linear)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
