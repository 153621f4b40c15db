"""Connecting to Ray: the running cluster when there is one (``ray job submit`` sets RAY_ADDRESS), else an
in-process local instance (the embedded default)."""
from __future__ import annotations

import logging
import os
import sys

import ray
import ray.data

FORWARDED_ENV = ("AWS_", "MLFLOW_", "ANOPLE_", "HF_", "OPENBLAS_")
# Never through a runtime env: Ray writes runtime envs to its logs (runtime_env_agent.log). Local workers
# inherit credentials from this process's environment; a cluster's nodes get them from their own
# (a Kubernetes Secret, an instance role), never from the job.
SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "KEY", "CREDENTIAL", "SESSION")


def forwarded_env(environ: dict[str, str]) -> dict[str, str]:
    """The variables the jobs read that local workers get through the runtime env: settings, no secrets."""
    return {k: v for k, v in environ.items()
            if k.startswith(FORWARDED_ENV) and not any(w in k.upper() for w in SECRET_WORDS)}


def init_ray(num_cpus: int | None = None) -> dict:
    """ray.init once; returns the cluster's resources."""
    if not ray.is_initialized():
        kwargs: dict = {"ignore_reinit_error": True, "logging_level": logging.WARNING, "log_to_driver": True}
        if not os.environ.get("RAY_ADDRESS"):
            # Local workers start from this process; pass on what the jobs read from the environment.
            env = forwarded_env(dict(os.environ))
            kwargs.update(num_cpus=num_cpus, include_dashboard=False,
                          runtime_env={"env_vars": env, "worker_process_setup_hook": "pipeline.cluster.quiet_worker"})
        ray.init(**kwargs)
    ctx = ray.data.DataContext.get_current()
    # Ray Data's bars on a terminal; in a log file they are noise, and the jobs print progress lines instead
    # (pipeline.progress). Ray's own INFO chatter stays out (logging_level above); its warnings and the
    # workers' output stay in (deduplicated across workers by Ray's default RAY_DEDUP_LOGS).
    ctx.enable_progress_bars = sys.stderr.isatty()
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray.cluster_resources()


def quiet_worker() -> None:
    """Setup hook of local workers: their INFO chatter (Ray Train's per-report lines, open_clip's loading
    steps) stays out of the user's view, warnings stay in. Without the dashboard (the embedded local instance
    starts none) Ray's State API is absent, and Ray Train's placement-group cleaner warns about it every
    second of a fit ("Failed to query Ray Train Controller actor state"): that one logger is raised to ERROR.
    It only matters when a controller dies ungracefully, which the local instance's shutdown covers."""
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def cluster_gpus() -> float:
    return ray.cluster_resources().get("GPU", 0)


def has_gpus() -> bool:
    return cluster_gpus() > 0
