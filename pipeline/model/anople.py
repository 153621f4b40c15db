"""AnoPLe (arXiv 2408.13516) on a frozen open_clip CLIP: bidirectional deep prompts, scale-aware prefix,
decoder on patch-text similarities, fused at inference with the memory-bank map.

Only the prompts, the prompt maps f_v->t / f_t->v, the prefixes, the [abnormal] tokens, the decoder and
the alignment weights train; every CLIP parameter stays frozen (requires_grad False, eval mode).

Token layout of the visual sequence (prompted layers j = 0..J-1):
    [CLS] [c_s] [patch_1 .. patch_HW] [P_j^v, f_t->v(P_j^t)]
and of the text sequence (77 tokens, causal):
    [SOS] [P_j^t, f_v->t(P_j^v)] ([abnormal] for the abnormal prompt) [class words] [.] [EOT] ...
At layer j >= 1 the prompt slots are replaced by layer j's prompts (deep prompting); the prefix and the
[abnormal] tokens are inserted at the input only.

Two side paths read the same images (config `patch_path`, `bank_source`; the earlier wiring is each switch's other
value):
- the decoder's patch tokens come from a value-value attention path (CLIP Surgery, as PromptAD computes its
  patch-text map): from the first decoder layer on, x_vv += out_proj(softmax(v v^T / sqrt(d_h)) v) with v the value
  projection of the prompted path's ln_1 input, no MLP; CLIP's q-k tokens localise poorly;
- the memory bank reads the frozen, unprompted CLIP's tokens (PromptAD), so prompts trained for the decoder and
  text losses cannot move the features the kNN compares (a second, partial forward up to the last bank layer).
"""
from __future__ import annotations

from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from .config import AnoPLeConfig


@dataclass
class Encoded:
    """One image batch through the visual tower: the unit global embedding z_0, the decoder layers' patch tokens
    and the bank layers' patch tokens (each from its own path: see the module docstring)."""
    z0: torch.Tensor                   # [B, D]
    patches: dict[int, torch.Tensor]   # decoder layer (1-based block) -> [B, HW, d_v]
    bank: dict[int, torch.Tensor]      # bank layer (1-based block) -> [B, HW, d_v]; {} when not asked for

    def __len__(self) -> int:
        return self.z0.shape[0]

    def rows(self, idx) -> "Encoded":
        """The images at `idx` (a list, slice or index tensor)."""
        return Encoded(self.z0[idx], {l: t[idx] for l, t in self.patches.items()},
                       {l: t[idx] for l, t in self.bank.items()})

    def float(self) -> "Encoded":
        return Encoded(self.z0.float(), {l: t.float() for l, t in self.patches.items()},
                       {l: t.float() for l, t in self.bank.items()})

    @staticmethod
    def cat(parts: list["Encoded"]) -> "Encoded":
        """Batches of one model, stacked along B."""
        return Encoded(torch.cat([p.z0 for p in parts]),
                       {l: torch.cat([p.patches[l] for p in parts]) for l in parts[0].patches},
                       {l: torch.cat([p.bank[l] for p in parts]) for l in parts[0].bank})


def _scaled(depth: int, fractions: tuple[float, ...]) -> tuple[int, ...]:
    return tuple(sorted({min(depth, max(1, round(depth * f))) for f in fractions}))


class AnoPLe(nn.Module):
    def __init__(self, clip: nn.Module, cfg: AnoPLeConfig, tokenizer):
        super().__init__()
        if not hasattr(clip, "token_embedding"):
            raise ValueError("AnoPLe needs an open_clip CLIP with the built-in text tower (token_embedding)")
        self.clip = clip.eval().requires_grad_(False)  # frozen backbone
        self.cfg = cfg
        self.tokenizer = tokenizer
        v = clip.visual
        self.depth = len(v.transformer.resblocks)
        self.d_v = v.transformer.width
        self.d_t = clip.transformer.width
        size, patch = v.image_size, v.patch_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.grid = (self.image_size // int(patch[0] if isinstance(patch, (tuple, list)) else patch),) * 2
        self.J = min(self.depth, cfg.prompt_depth or max(1, round(self.depth * 3 / 4)))
        self.bank_layers = cfg.bank_layers or _scaled(self.depth, (3 / 12, 8 / 12))
        self.decoder_layers = cfg.decoder_layers or _scaled(self.depth, (1 / 2, 3 / 4, 1.0))
        for name, layers in (("bank", self.bank_layers), ("decoder", self.decoder_layers)):
            if min(layers) < 1 or max(layers) > self.depth:
                raise ValueError(f"{name} layers {layers} outside 1..{self.depth}")
        # every learnable part is initialised from the run's seed (nn.Linear / Conv2d draw from the
        # global RNG, so fork it): same seed, same model, whatever ran before in the process
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self._init_learnable(cfg)

    def _init_learnable(self, cfg: AnoPLeConfig) -> None:
        n_t, n_v = cfg.n_ctx_text, cfg.n_ctx_visual

        def param(*shape, std=0.02):
            return nn.Parameter(torch.randn(*shape) * std)

        # deep prompts, one set per prompted layer: P^t [J, n_t, d_t], P^v [J, n_v, d_v]
        self.text_ctx = param(self.J, n_t, self.d_t) if cfg.text_prompts else None
        self.visual_ctx = param(self.J, n_v, self.d_v) if cfg.visual_prompts else None
        # the learnable maps exchanging prompts between the towers (one linear map per layer)
        self.f_t2v = nn.ModuleList(nn.Linear(self.d_t, self.d_v) for _ in range(self.J)) if cfg.t2v else None
        self.f_v2t = nn.ModuleList(nn.Linear(self.d_v, self.d_t) for _ in range(self.J)) if cfg.v2t else None
        # the [abnormal] state tokens: CLIP's own embedding of the word (the paper refines CLIP's prior), or noise
        self.abnormal = None
        if cfg.text_prompts:
            self.abnormal = nn.Parameter(self.word_embedding(cfg.abnormal_word, cfg.n_abnormal).clone()
                                         if cfg.abnormal_init == "word" else torch.randn(cfg.n_abnormal, self.d_t) * 0.02)
        # scale-aware prefix c in R^{(N+1) x d_v}: c_0 global view, c_1..c_4 quadrant crops
        self.prefix = param(5, self.d_v) if cfg.use_prefix and cfg.trains else None
        # decoder, part 1: one linear adapter per decoder layer taking patch tokens into the joint space,
        # initialised to CLIP's own projection (so a pretrained CLIP starts from its zero-shot similarity)
        D = self.clip.visual.proj.shape[1]
        self.adapters = nn.ModuleList(nn.Linear(self.d_v, D) for _ in self.decoder_layers) if cfg.trains else None
        if self.adapters is not None:
            with torch.no_grad():
                for a in self.adapters:
                    a.weight.copy_(self.clip.visual.proj.T)
                    a.bias.zero_()
        # decoder, part 2: per-layer abnormal probabilities [B, L, h, w] -> anomaly logits [B, 1, h, w]
        L = len(self.decoder_layers)
        self.decoder = nn.Sequential(
            nn.Conv2d(L, cfg.decoder_hidden, 3, padding=1, padding_mode="replicate"), nn.GELU(),
            nn.Conv2d(cfg.decoder_hidden, cfg.decoder_hidden, 3, padding=1, padding_mode="replicate"), nn.GELU(),
            nn.Conv2d(cfg.decoder_hidden, 1, 1)) if cfg.trains else None
        # alignment weights of L_align: M_ij = softmax_ij(a * logit_ij), a = exp(align_log_scale) > 0 (a bias
        # inside a softmax has no gradient); legacy: softmax_ij(a * logit_ij + b) as an nn.Linear(1, 1)
        self.align = nn.Linear(1, 1) if cfg.trains and cfg.align_pool == "linear" else None
        self.align_log_scale = nn.Parameter(torch.zeros(())) if cfg.trains and cfg.align_pool == "softmax" else None

    def word_embedding(self, word: str, n: int) -> torch.Tensor:
        """CLIP's token embedding of `word` as n slots [n, d_t]: its BPE tokens, averaged in n groups when it has
        more than n, the last one repeated when it has fewer."""
        ids = self.tokenizer([word])[0]  # [77]: SOS, the word's tokens, EOT, padding
        eot = int(ids.argmax())
        emb = self.clip.token_embedding.weight[ids[1:eot]].detach().float()  # [k, d_t]
        if emb.shape[0] == 0:
            raise ValueError(f"abnormal_word {word!r} has no tokens")
        if emb.shape[0] >= n:
            return torch.stack([g.mean(0) for g in torch.tensor_split(emb, n)])
        return torch.cat([emb, emb[-1:].expand(n - emb.shape[0], -1)])

    # ---------------------------------------------------------------- prompts
    @property
    def n_text_slots(self) -> int:
        return (self.cfg.n_ctx_text + (self.cfg.n_ctx_visual if self.cfg.v2t else 0)) if self.cfg.text_prompts else 0

    @property
    def n_visual_slots(self) -> int:
        if not self.cfg.visual_prompts:
            return 0
        return self.cfg.n_ctx_visual + (self.cfg.n_ctx_text if self.cfg.t2v else 0)

    def text_slots(self, j: int) -> torch.Tensor:
        """[P_j^t, f_v->t(P_j^v)]: [n_text_slots, d_t]."""
        parts = [self.text_ctx[j]]
        if self.cfg.v2t:
            parts.append(self.f_v2t[j](self.visual_ctx[j]))
        return torch.cat(parts)

    def visual_slots(self, j: int) -> torch.Tensor:
        """[P_j^v, f_t->v(P_j^t)]: [n_visual_slots, d_v]."""
        parts = [self.visual_ctx[j]]
        if self.cfg.t2v:
            parts.append(self.f_t2v[j](self.text_ctx[j]))
        return torch.cat(parts)

    # ---------------------------------------------------------------- text tower
    def _tokens(self, products: list[str]) -> tuple[torch.Tensor, int]:
        """Token ids [2P, 77]: (normal, abnormal) per product; placeholders 'X' hold the learnable slots. A product
        is named by its class words (config class_names: "pcb1" -> "printed circuit board")."""
        names = [self.cfg.class_text(p) for p in products]
        if not self.cfg.text_prompts:  # visual-only / bank-only: hand-crafted prompts, nothing learnable
            texts = [t for n in names for t in (f"a photo of a flawless {n}.", f"a photo of a damaged {n}.")]
            return self.tokenizer(texts), 0
        s, a = self.n_text_slots, self.cfg.n_abnormal
        texts = [t for n in names for t in ("X " * s + f"{n}.", "X " * (s + a) + f"{n}.")]
        return self.tokenizer(texts), s

    def encode_text(self, products: list[str]) -> torch.Tensor:
        """-> unit text features [P, 2, D] (index 0 normal, 1 abnormal) for the products."""
        clip = self.clip
        device = clip.token_embedding.weight.device
        ids, s = self._tokens(products)
        ids = ids.to(device)
        x = clip.token_embedding(ids)  # [2P, 77, d_t]
        if s:
            x = x.clone()
            x[:, 1:1 + s] = self.text_slots(0).to(x.dtype)  # [n_text_slots, d_t] into every prompt
            a = self.cfg.n_abnormal
            x[1::2, 1 + s:1 + s + a] = self.abnormal.to(x.dtype)  # abnormal prompts only
        x = x + clip.positional_embedding.to(x.dtype)
        for j, block in enumerate(clip.transformer.resblocks):
            if s and 1 <= j < self.J:  # deep text prompts replace the slots
                x = torch.cat([x[:, :1], self.text_slots(j).expand(x.shape[0], -1, -1).to(x.dtype), x[:, 1 + s:]], 1)
            x = block(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0], device=device), ids.argmax(dim=-1)]  # EOT token [2P, d_t]
        x = x @ clip.text_projection if not isinstance(clip.text_projection, nn.Linear) else clip.text_projection(x)
        return F.normalize(x, dim=-1).view(len(products), 2, -1)

    # ---------------------------------------------------------------- visual tower
    def encode_image(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                     latent_noise: torch.Tensor | None = None, bank: bool = True) -> Encoded:
        """x [B, 3, S, S]; scale [B] prefix index (0 = global view); latent_noise [B, HW, d_v] standard
        normal noise, zero outside the pseudo-anomalous patch tokens (training only); bank: also the bank
        layers' tokens (training needs none)."""
        v = self.clip.visual
        B = x.shape[0]
        h = v._embeds(x)  # [B, 1 + HW, d_v] (CLS, patches; pos-embedded, ln_pre)
        hw = h.shape[1] - 1
        frozen_bank = bank and self.cfg.bank_source == "frozen" and (self.prefix is not None or self.n_visual_slots)
        bank_out = self._frozen_tokens(h, hw) if frozen_bank else {}
        n_pre = 0
        if self.prefix is not None:  # c_s after CLS: [B, 1 + 1 + HW, d_v]
            idx = torch.zeros(B, dtype=torch.long, device=h.device) if scale is None else scale.to(h.device)
            h = torch.cat([h[:, :1], self.prefix[idx].unsqueeze(1).to(h.dtype), h[:, 1:]], 1)
            n_pre = 1
        p0 = 1 + n_pre  # first patch token
        nvs = self.n_visual_slots
        if nvs:  # prompt slots at the end: [B, p0 + HW + nvs, d_v]
            h = torch.cat([h, self.visual_slots(0).expand(B, -1, -1).to(h.dtype)], 1)
        decoder = set(self.decoder_layers) if self.decoder is not None else set()
        bank_here = set(self.bank_layers) if bank and not frozen_bank else set()
        vv_from = min(decoder) if decoder and self.cfg.patch_path == "vv" else None  # first block of the v-v path
        noise_at = max(1, self.depth // 4)  # latent perturbation after this block (early-middle features)
        out, x_vv = {}, None
        for j, block in enumerate(v.transformer.resblocks):
            if nvs and 1 <= j < self.J:  # deep visual prompts replace the slots
                h = torch.cat([h[:, :-nvs], self.visual_slots(j).expand(B, -1, -1).to(h.dtype)], 1)
            if vv_from is not None and vv_from <= j + 1 <= max(decoder):
                # v-v path: starts as the block's input, then adds each block's v-v attention of the prompted
                # path's normalised input (CLIP Surgery); no MLP on this path
                x_vv = h if x_vv is None else x_vv
                x_vv = x_vv + block.ls_1(value_value_attention(block.attn, block.ln_1(h)))
            h = block(h)  # [B, p0 + HW + nvs, d_v]
            if latent_noise is not None and j + 1 == noise_at:
                patches = h[:, p0:p0 + hw]  # [B, HW, d_v]
                noise = latent_noise.to(h.dtype) * patches.detach().std() * self.cfg.latent_noise_std
                h = torch.cat([h[:, :p0], patches + noise, h[:, p0 + hw:]], 1)
            if j + 1 in decoder:
                out[j + 1] = (h if x_vv is None else x_vv)[:, p0:p0 + hw]  # [B, HW, d_v]
            if j + 1 in bank_here:
                bank_out[j + 1] = h[:, p0:p0 + hw]  # [B, HW, d_v]
        z0 = v.ln_post(h[:, 0]) @ v.proj  # [B, D]
        return Encoded(F.normalize(z0, dim=-1), out, bank_out)

    def _frozen_tokens(self, h: torch.Tensor, hw: int) -> dict[int, torch.Tensor]:
        """The unprompted CLIP's patch tokens of the bank layers, from its embedded input h [B, 1 + HW, d_v]:
        no prefix, no prompt slots, no latent noise (PromptAD's bank)."""
        out = {}
        for j, block in enumerate(self.clip.visual.transformer.resblocks[:max(self.bank_layers)]):
            h = block(h)
            if j + 1 in self.bank_layers:
                out[j + 1] = h[:, 1:1 + hw]  # [B, HW, d_v]
        return out

    # ---------------------------------------------------------------- heads
    def text_head(self, enc: Encoded, text: torch.Tensor) -> dict:
        """Patch-text similarities -> decoder logits; image-text logits; alignment vector s.

        text [B, 2, D] (each image's product's normal/abnormal features)."""
        B = text.shape[0]
        h, w = self.grid
        probs, last = [], None
        for l, adapter in zip(self.decoder_layers, self.adapters):
            p = F.normalize(adapter(self.clip.visual.ln_post(enc.patches[l])), dim=-1)  # [B, HW, D]
            sim = torch.einsum("bnd,bkd->bnk", p, text) / self.cfg.temperature  # [B, HW, 2]
            probs.append(sim.softmax(-1)[..., 1].view(B, 1, h, w))  # abnormal probability per patch
            last = p
        logits = self.decoder(torch.cat(probs, 1))  # [B, 1, h, w]
        img = torch.einsum("bd,bkd->bk", enc.z0, text) / self.cfg.temperature  # [B, 2]
        # L_align's s = sum_ij M_ij D_ij(z): the patch embeddings D (last decoder layer), pooled with weights M
        # that follow the anomaly logits, so that z_0 is pulled towards the local evidence
        flat = logits.flatten(1)  # [B, HW]
        if self.align is not None:  # legacy: a bias inside the softmax (inert) and the evidence applied twice
            M = self.align(flat.unsqueeze(-1)).squeeze(-1).softmax(-1)  # [B, HW]
            D = torch.sigmoid(flat).unsqueeze(-1) * last  # [B, HW, D]
        else:
            M = (self.align_log_scale.exp() * flat).softmax(-1)  # [B, HW]
            D = last  # [B, HW, D]
        s = torch.einsum("bn,bnd->bd", M, D)
        return {"logits": logits, "image_logits": img, "s": s}

    def bank_features(self, enc: Encoded) -> list[torch.Tensor]:
        """Unit patch tokens of the bank layers: per layer [B, HW, d_v]."""
        return [F.normalize(enc.bank[l].float(), dim=-1) for l in self.bank_layers]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("clip.")]

    def parameter_groups(self) -> list[dict]:
        """Prompts (lr) and heads (head_lr) as optimiser parameter groups."""
        heads = ("decoder.", "adapters.", "align.", "align_log_scale")
        named = [(n, p) for n, p in self.named_parameters() if not n.startswith("clip.")]
        return [{"params": [p for n, p in named if not n.startswith(heads)], "lr": self.cfg.lr, "base_lr": self.cfg.lr},
                {"params": [p for n, p in named if n.startswith(heads)], "lr": self.cfg.head_lr,
                 "base_lr": self.cfg.head_lr}]

    def prompt_state(self) -> dict[str, torch.Tensor]:
        """Everything that trains (what the artifact stores as safetensors)."""
        return {n: p.detach().cpu().contiguous() for n, p in self.named_parameters() if not n.startswith("clip.")}

    def load_prompt_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy trained parameters in; refused (ValueError) unless every tensor has exactly its parameter's shape
        and only finite values (copy_ would broadcast a wrong shape silently; NaN would score NaN)."""
        own = dict(self.named_parameters())
        missing = sorted(n for n in own if not n.startswith("clip.") and n not in state)
        extra = sorted(n for n in state if n not in own)
        if missing or extra:
            raise ValueError(f"prompt state does not fit this config: missing {missing}, unexpected {extra}")
        for n, t in state.items():
            if tuple(t.shape) != tuple(own[n].shape):
                raise ValueError(f"prompt tensor {n} has shape {list(t.shape)}, the model's is {list(own[n].shape)}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"prompt tensor {n} holds non-finite values")
        with torch.no_grad():
            for n, t in state.items():
                own[n].copy_(t.to(own[n].device, own[n].dtype))

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # the backbone never leaves eval mode (no dropout / stat updates)
        return self


def build_tokenizer(arch: str):
    return open_clip.get_tokenizer(arch)


def quadrant_views(x: torch.Tensor, size: int) -> torch.Tensor:
    """The N=4 non-overlapping quadrant crops of the image at 2x the model's size: [B, C, S', S'] -> [4B, C, S, S],
    ordered (top-left, top-right, bottom-left, bottom-right) per image, i.e. prefixes c_1..c_4. An image at 2S
    (the paper: 240 px quadrants of the 480 px image) is cut as it is; any other size is first resized to 2S
    bilinearly (crop_source "upsample" hands the S-pixel view, whose crops then carry no new detail)."""
    big = x if x.shape[-1] == 2 * size else F.interpolate(x, size=(2 * size, 2 * size), mode="bilinear",
                                                          align_corners=False)  # [B, C, 2S, 2S]
    q = [big[..., :size, :size], big[..., :size, size:], big[..., size:, :size], big[..., size:, size:]]
    return torch.stack(q, 1).flatten(0, 1)


def value_value_attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """CLIP Surgery's v-v self-attention with a block's own weights: x [B, L, d] (the block's ln_1 output) ->
    out_proj(softmax(v v^T / sqrt(d_h)) v) per head, v = x W_v^T + b_v: [B, L, d]. Queries and keys are the values,
    so a patch attends to patches that look like it rather than to CLIP's global sinks."""
    if not isinstance(attn, nn.MultiheadAttention) or not attn.batch_first or attn.in_proj_weight is None:
        raise ValueError("patch_path 'vv' needs open_clip's batch-first nn.MultiheadAttention blocks; "
                         "use patch_path 'qk' with this architecture")
    B, L, d = x.shape
    H = attn.num_heads
    bias = attn.in_proj_bias[2 * d:] if attn.in_proj_bias is not None else None
    v = F.linear(x, attn.in_proj_weight[2 * d:], bias).view(B, L, H, d // H).transpose(1, 2)  # [B, H, L, d_h]
    o = F.scaled_dot_product_attention(v, v, v)  # [B, H, L, d_h]
    return attn.out_proj(o.transpose(1, 2).reshape(B, L, d))  # [B, L, d]
