"""What a Ray Train fit is handed: the run's config, the deployment's products and the function each
worker runs.

Light on purpose (dataclasses and pipeline.fitting.config): Ray Train's controller process
unpickles the train function and its config, and should start the workers without first importing torch,
open_clip, faiss and MLflow (seconds of CPU and about a gigabyte resident); the workers import the training
code when they run it."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline.fitting.config import TrainConfig


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
    """Ray Train's per-worker entry: pipeline.fitting.worker.learn_and_fit, imported in the worker only."""
    # Ray Train configures its workers' root logger at INFO after the process's setup hook ran
    # (cluster.quiet_worker): back to WARNING before faiss and open_clip log their loading steps
    logging.getLogger().setLevel(logging.WARNING)
    from pipeline.fitting.worker import learn_and_fit
    learn_and_fit(config)
