"""AnoPLe's knobs, one typed config. The numbers the paper leaves open default to PromptAD's, its closest
peer (bank layers 3 and 8, blur sigma 4, lr 0.002 with cosine decay, 4 context tokens); the optimiser and
step budget were chosen on the validation signal (pipeline.fitting.validation), not on test defects."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

PROMPT_MODES = ("bi", "t2i", "i2t", "text", "visual", "none")
PSEUDO_KINDS = ("paste", "noise", "texture", "perlin")  # pixel pseudo-anomalies (pipeline.model.pseudo)
FUSIONS = ("harmonic", "weighted", "text", "bank")
# the image score (Sec. 3.5 leaves how z_0 enters open): "map" = max of the fused map; "global_bank" = harmonic mean
# of z_0's abnormal probability and the bank map's max (PromptAD); "global_map" = the same with the fused map's max;
# "auto" = the one the fit's validation signal ranks first (recorded in the artifact)
IMAGE_SCORES = ("map", "global_bank", "global_map")
FUSION_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # grid the validation chooses from
# CLIP's input normalisation per RGB channel (open_clip OPENAI_DATASET_MEAN / STD): the backbone's, so here;
# plain tuples, so the decode tasks (pipeline.sources.images, numpy) read them without importing torch
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class AnoPLeConfig:
    # prompts (paper Sec. 3.2); ablations: text only, visual only, T->I only, I->T only, bidirectional
    prompt_mode: str = "bi"          # bi | t2i | i2t | text | visual | none (= memory bank only)
    n_ctx_text: int = 4              # learnable text context tokens P^t per layer (PromptAD: 4)
    n_ctx_visual: int = 4            # learnable visual prompt tokens P^v per layer
    n_abnormal: int = 1              # learnable [abnormal] state tokens of the abnormal prompt
    prompt_depth: int = 0            # prompted layers J; 0 = 3/4 of the backbone depth (9 of 12)
    # scale-aware prefix c in R^{(N+1) x d_v} (Sec. 3.3)
    use_prefix: bool = True
    multiscale: bool = True          # train on the global view + N=4 quadrant crops of the 2x resize
    # decoder on patch-text similarities (Sec. 3.4)
    decoder_layers: tuple[int, ...] = ()  # 1-based blocks; () = depth/2, 3/4, 1 (6, 9, 12 of 12)
    decoder_hidden: int = 32
    temperature: float = 0.07        # patch/image-text similarity temperature
    # losses: L = L_pixel (focal + dice) + L_img + L_align
    use_pixel_loss: bool = True
    use_img_loss: bool = True
    use_align_loss: bool = True
    focal_gamma: float = 2.0
    # pseudo-anomalies from normal shots only
    pseudo_pixel: bool = True        # pasted / noised / texture patches with exact masks
    pseudo_latent: bool = True       # noise on a region of patch tokens
    pseudo_prob: float = 0.5         # share of training views given a pseudo-anomaly
    latent_noise_std: float = 1.0    # relative to the tokens' own std
    # memory bank and fusion (Sec. 3.5)
    bank_layers: tuple[int, ...] = ()  # 1-based; () = PromptAD's 3 and 8 scaled to the depth
    fusion: str = "harmonic"         # harmonic (the paper's raw harmonic mean) | weighted | text | bank
    fusion_weight: float = -1.0      # weighted: (1 - w) bank/level + w text/level; -1 = w chosen on the
                                     # validation signal (0 = the bank alone: a decoder that does not help
                                     # is silenced; one that does is heard whatever its scale), 0.5 when
                                     # training runs without validation
    fusion_calibrated: bool = False  # True: divide each map by its level on normal calibration images
                                     # before the harmonic mean; False: raw maps, as the paper's equation
                                     # reads (better once the decoder is trained: see the ablation table)
    blur_sigma: float = 4.0
    # optimisation, budgeted in optimiser steps (never in passes over a handful of shots): an epoch is
    # `steps_per_epoch` steps, each on `batch_shots` shots drawn from the pool (each shot with its own
    # pseudo-anomaly draw, so a 1-shot product fills a batch too); cosine decay over all the steps.
    # Chosen on the validation signal (README, "The default recipe"); PromptAD's SGD is a switch.
    optimizer: str = "adamw"         # adamw | sgd (PromptAD: SGD, momentum 0.9, lr 0.002)
    epochs: int = 12                 # validation + checkpoint after each; at most epochs * steps_per_epoch steps
    steps_per_epoch: int = 25
    batch_shots: int = 4             # shots per optimiser step (5 views each with multiscale)
    lr: float = 0.002                # prompts, prefixes and prompt maps (PromptAD's)
    head_lr: float = 0.002           # decoder, adapters, alignment weights (learned from scratch)
    lr_min: float = 1e-5
    momentum: float = 0.9            # SGD only
    weight_decay: float = 5e-4
    # validation without test data: held-out normals (or views of the shots) with pseudo-anomalies of the
    # kinds held out of training; best epoch kept, early stop after `patience` epochs without a gain
    validate: bool = True
    val_kinds: tuple[str, ...] = ("perlin",)  # pixel pseudo-anomaly kinds used only for validation
    val_images: int = 4              # normal images per product behind the validation set
    patience: int = 4                # epochs without improvement before stopping (0: never stop early)
    seed: int = 0
    # how the parts are wired: the paper's (or, where it is silent, PromptAD's) by default; the earlier wiring
    # is each switch's other value (LEGACY_WIRING), which artifacts trained before these keys existed score with
    image_score: str = "auto"        # auto | map | global_bank | global_map (IMAGE_SCORES)
    crop_source: str = "detail"      # detail: quadrants of the image at 2x the model's size (the paper: 240 px
                                     # quadrants of the 480 px image); upsample: of a 2x bilinear upsample
    abnormal_init: str = "word"      # word: [abnormal] starts as the token embedding of `abnormal_word` (CLIP's
                                     # prior, the paper); random: N(0, 0.02)
    abnormal_word: str = "abnormal"
    patch_path: str = "vv"           # vv: the decoder reads patch tokens of the value-value attention path (CLIP
                                     # Surgery, as PromptAD); qk: CLIP's ordinary (q-k attention) tokens
    bank_source: str = "frozen"      # frozen: the bank reads the unprompted CLIP's tokens (PromptAD); prompted:
                                     # the prompted encoder's (costs no second forward, moves with the prompts)
    pseudo_shape: str = "irregular"  # irregular: training's pseudo-anomalies fill smooth-noise blobs (DRAEM's
                                     # shapes), latent ones blobs of patches; box: axis-aligned rectangles
    align_pool: str = "softmax"      # softmax: M = softmax_ij(a * logit_ij) over unit patch features D_ij;
                                     # linear: softmax(a * logit + b) over sigmoid(logit)-scaled features
    class_names: dict = field(default_factory=dict)  # product -> the words its prompts use ("pcb1" ->
                                     # "printed circuit board"); a product not named uses its name, _ and - as spaces

    def __post_init__(self):
        if self.prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt_mode {self.prompt_mode!r} not in {PROMPT_MODES}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer {self.optimizer!r} is 'sgd' or 'adamw'")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion {self.fusion!r} not in {FUSIONS}")
        if not (self.fusion_weight == -1.0 or 0.0 <= self.fusion_weight <= 1.0):
            raise ValueError(f"fusion_weight {self.fusion_weight} is in [0, 1], or -1 (chosen on validation)")
        if self.prompt_mode == "none" and self.fusion != "bank":
            raise ValueError("prompt_mode 'none' has no text map: use fusion 'bank'")
        if self.prompt_mode == "none" and self.image_score.startswith("global"):
            raise ValueError("prompt_mode 'none' trains no global branch: use image_score 'map' or 'auto'")
        self.decoder_layers = tuple(self.decoder_layers)
        self.bank_layers = tuple(self.bank_layers)
        self.val_kinds = tuple(self.val_kinds)
        if not self.val_kinds or set(self.val_kinds) - set(PSEUDO_KINDS):
            raise ValueError(f"val_kinds {self.val_kinds} must be some of {PSEUDO_KINDS}")
        for knob, allowed in WIRING_CHOICES.items():
            if getattr(self, knob) not in allowed:
                raise ValueError(f"{knob} {getattr(self, knob)!r} not in {allowed}")
        self.class_names = {str(k): str(v) for k, v in dict(self.class_names or {}).items()}
        if any(not v.strip() for v in self.class_names.values()):
            raise ValueError("a class name is some words, not empty")
        if self.epochs < 0 or self.steps_per_epoch < 1 or self.batch_shots < 1:
            raise ValueError("epochs >= 0, steps_per_epoch >= 1 and batch_shots >= 1")

    def class_text(self, product: str) -> str:
        """The words a product's prompts use."""
        return self.class_names.get(product) or product.replace("_", " ").replace("-", " ")

    @property
    def text_prompts(self) -> bool:   # deep learnable text prompts P^t
        return self.prompt_mode in ("bi", "t2i", "i2t", "text")

    @property
    def visual_prompts(self) -> bool:  # deep learnable visual prompts P^v
        return self.prompt_mode in ("bi", "t2i", "i2t", "visual")

    @property
    def t2v(self) -> bool:  # f_t->v maps text prompts into the visual prompts
        return self.prompt_mode in ("bi", "t2i")

    @property
    def v2t(self) -> bool:  # f_v->t maps visual prompts into the text prompts
        return self.prompt_mode in ("bi", "i2t")

    @property
    def trains(self) -> bool:
        return self.prompt_mode != "none"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["decoder_layers"], d["bank_layers"] = list(self.decoder_layers), list(self.bank_layers)
        d["val_kinds"] = list(self.val_kinds)
        d["class_names"] = dict(sorted(self.class_names.items()))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AnoPLeConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown AnoPLe config keys: {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_artifact(cls, d: dict) -> "AnoPLeConfig":
        """An artifact's stored config: a wiring knob it does not name was trained with the earlier wiring, so it
        scores with that (LEGACY_WIRING), never with today's default."""
        return cls.from_dict(LEGACY_WIRING | d)


WIRING_CHOICES = {"image_score": ("auto",) + IMAGE_SCORES, "crop_source": ("detail", "upsample"),
                  "abnormal_init": ("word", "random"), "patch_path": ("vv", "qk"),
                  "bank_source": ("frozen", "prompted"), "pseudo_shape": ("irregular", "box"),
                  "align_pool": ("softmax", "linear")}
LEGACY_WIRING = {"image_score": "map", "crop_source": "upsample", "abnormal_init": "random", "patch_path": "qk",
                 "bank_source": "prompted", "pseudo_shape": "box", "align_pool": "linear"}
