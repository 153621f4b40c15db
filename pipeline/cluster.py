"""Connecting to Ray: the running cluster when there is one (``ray job submit`` sets RAY_ADDRESS), else an
in-process local instance (the embedded default)."""
from __future__ import annotations

import logging
import math
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


def train_worker_cpus(num_workers: int, use_gpu: bool, requested: int = 0) -> int:
    """CPUs each Ray Train worker reserves (and runs torch on): `requested` when given, else the cores of the
    smallest node that can host a worker (a GPU node when the fit uses GPUs), shared by the workers that land
    on it. Ray's default of one CPU a worker pins a CPU fit's torch to one thread on a many-core node
    (Ray sets OMP_NUM_THREADS to the reservation); the reservation also keeps two workers from sharing cores
    they both think are theirs. A cluster still scaling up (no such node alive) gets one CPU a worker."""
    if requested > 0:
        return requested
    needs = ["GPU" if use_gpu else "CPU", *worker_resources()]  # a node with all of them can host a worker
    hosts = [n["Resources"].get("CPU", 0.0) for n in ray.nodes()
             if n.get("Alive") and n["Resources"].get("CPU", 0.0) >= 1
             and all(n["Resources"].get(k, 0.0) > 0 for k in needs) and n["Resources"].get(needs[0], 0.0) >= 1]
    if not hosts:
        return 1
    per_node = math.ceil(max(1, num_workers) / len(hosts))
    return max(1, int(min(hosts) // per_node))


def worker_resources() -> dict[str, float]:
    """What every scoring actor and training worker asks for besides CPUs and GPUs: a sliver of the custom
    resource named by ANOPLE_WORKER_RESOURCE, which the cluster gives only to its worker nodes (`ray start
    --resources '{"anople_worker": 1}'`), so that the model's work stays off the head (its driver, Ray Data's
    reads). Unset: anywhere (a GPU cluster places GPU actors on its GPU nodes by itself)."""
    name = os.environ.get("ANOPLE_WORKER_RESOURCE", "").strip()
    return {name: 0.001} if name else {}


def alive_nodes() -> list[str]:
    """Ids of the cluster's live nodes (a night compares them at its start and end)."""
    return sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
