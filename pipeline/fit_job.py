"""What a Ray Train fit is handed: the run's config, the deployment's products and the function each
worker runs.

Light on purpose (dataclasses, pipeline.storage, pipeline.model.config): Ray Train's controller process
unpickles the train function and its config, and should start the workers without first importing torch,
open_clip, faiss and MLflow (seconds of CPU and about a gigabyte resident); the workers import the training
code when they run it."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

from pipeline import storage
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
    prompt_products: tuple[str, ...] = ()  # products whose shots train the prompts; () = all
                                           # (leave-one-product-out: all but the unseen one)

    def run_key(self) -> str:
        """Same data, shots, seed, backbone and config -> same key: a rerun resumes that run."""
        blob = json.dumps([self.deployment, storage.normalize(self.archive), self.shots, self.seed, self.backbone,
                           self.weights, self.anople.to_dict(), sorted(self.prompt_products)], sort_keys=True)
        return f"anople-{self.deployment}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    def checkpoints(self) -> str:
        return storage.join(self.storage_path, self.run_key(), "prompt-checkpoints")


@dataclass(frozen=True)
class WorkerCrash:
    """Test-only fault: rank 0's process dies (os._exit) right after writing epoch `after_epoch`'s
    checkpoint, once per run (a marker in storage says it happened), as a preempted node would. Only the
    Python API takes it (fit_deployment's `fault`)."""
    after_epoch: int


@dataclass(frozen=True)
class FitJob:
    """What each Ray Train worker gets: the run's config (URIs normalised) and the deployment's products."""
    cfg: TrainConfig
    products: tuple[str, ...]
    fault: WorkerCrash | None = None
    mlflow_run: tuple[str, str] = ("", "")  # (tracking URI, run id): rank 0 logs each epoch there as it goes


def fit_worker(config: dict) -> None:
    """Ray Train's per-worker entry: pipeline.training.fit_worker, imported in the worker only."""
    # Ray Train configures its workers' root logger at INFO after the process's setup hook ran
    # (cluster.quiet_worker): back to WARNING before faiss and open_clip log their loading steps
    logging.getLogger().setLevel(logging.WARNING)
    from pipeline.training import fit_worker as run
    run(config)
