"""Connecting to Ray: the running cluster when there is one (``ray job submit`` sets RAY_ADDRESS), else an
in-process local instance (the embedded default)."""
from __future__ import annotations

import logging
import os

import ray
import ray.data

FORWARDED_ENV = ("AWS_", "MLFLOW_", "ANOPLE_", "HF_", "OPENBLAS_")


def init_ray(num_cpus: int | None = None) -> dict:
    """ray.init once; returns the cluster's resources."""
    if not ray.is_initialized():
        kwargs: dict = {"ignore_reinit_error": True, "logging_level": logging.WARNING, "log_to_driver": True}
        if not os.environ.get("RAY_ADDRESS"):
            # Local workers start from this process; pass on what the jobs read from the environment.
            env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
            kwargs.update(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env})
        ray.init(**kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # batch jobs log to files; progress bars only clutter them
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray.cluster_resources()


def has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0
