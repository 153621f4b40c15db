"""A training run's configuration: `TrainConfig` (what jobs.train and jobs.evaluate parse, handed whole to Ray
Train) and the AnoPLe knobs read from YAML (`load_config`; every knob and ablation switch is
pipeline.model.config.AnoPLeConfig). Light on purpose: Ray Train's controller unpickles a TrainConfig."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import yaml

from pipeline import storage
from pipeline.errors import UsageError
from pipeline.model import DEFAULT_BACKBONE, DEFAULT_WEIGHTS
from pipeline.model.config import AnoPLeConfig


@dataclass(frozen=True)
class TrainConfig:
    deployment: str
    archive: str
    shots: int = 1                       # K normal shots per product (the paper: 1, 2 or 4)
    seed: int = 0
    backbone: str = DEFAULT_BACKBONE     # open_clip architecture
    weights: str = DEFAULT_WEIGHTS       # hub tag, local file, s3:// URI, or "random"
    anople: AnoPLeConfig = field(default_factory=AnoPLeConfig)
    num_workers: int = 1
    use_gpu: bool = False
    storage_path: str = ""               # Ray Train storage and prompt checkpoints (local or s3://)
    restart: bool = False                # ignore earlier epoch checkpoints of the same run key
    cpus_per_worker: int = 0             # CPUs each Ray Train worker reserves and runs torch on; 0 = sized to the
                                         # nodes (pipeline.cluster.train_worker_cpus). Not in the run key: the
                                         # same fit on more threads resumes the same run
    prompt_products: tuple[str, ...] = ()  # products whose shots train the prompts; () = all
                                           # (leave-one-product-out: all but the unseen one)

    def run_key(self) -> str:
        """Same data, shots, seed, backbone and config -> same key: a rerun resumes that run."""
        blob = json.dumps([self.deployment, storage.normalize(self.archive), self.shots, self.seed, self.backbone,
                           self.weights, self.anople.to_dict(), sorted(self.prompt_products)], sort_keys=True)
        return f"anople-{self.deployment}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    def checkpoints(self) -> str:
        return storage.join(self.storage_path, self.run_key(), "prompt-checkpoints")


def load_config(uri: str | None = None, **overrides) -> AnoPLeConfig:
    """YAML file (local or s3://) -> AnoPLeConfig; keyword overrides (not None) win. Unknown keys fail."""
    data = {}
    if uri:
        try:
            data = yaml.safe_load(storage.read_bytes(uri).decode()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UsageError(f"bad config {uri}: {type(e).__name__}: {e}") from e
        if not isinstance(data, dict):
            raise UsageError(f"bad config {uri}: an AnoPLe config is a mapping of knob: value")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return AnoPLeConfig.from_dict(data)
    except (TypeError, ValueError) as e:  # the pure model package words its own checks as ValueError
        raise UsageError(f"bad config: {e}") from e
