"""Real Ray nodes for the cluster tests: `ray start` processes on loopback, each with its own temp folder.

Ports come from `free_port` (outside Ray's worker range and the kernel's ephemeral range). A start that
fails is retried on fresh ports with a warning that carries Ray's own output; after the last try the failure
is raised with that output and the tails of the node's logs.
"""
import glob
import os
import signal
import subprocess
import sys
import warnings

from tests.conftest import free_port

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) for every process we can read."""
    procs = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        procs[int(pid)] = (ppid, cmd)
    return procs


def kill_cluster(marker: str) -> None:
    """Stop only this test's nodes: every process whose command line names `marker` (a temp folder), and all
    their descendants (`ray stop` would also stop the suite's in-process Ray)."""
    procs = processes()
    doomed = {pid for pid, (_, cmd) in procs.items() if marker in cmd and pid != os.getpid()}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in doomed} - doomed
        doomed |= more
        grew = bool(more)
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _log_tails(temp: str, chars: int = 1500) -> str:
    """The end of each error log of the node's newest session, for a start that failed."""
    logs = os.path.join(temp, "session_latest", "logs")
    parts = []
    for path in sorted(glob.glob(os.path.join(logs, "*.err")) + glob.glob(os.path.join(logs, "gcs_server.out")) +
                       glob.glob(os.path.join(logs, "raylet.out"))):
        try:
            with open(path, errors="replace") as f:
                text = f.read()[-chars:]
        except OSError:
            continue
        if text.strip():
            parts.append(f"--- {os.path.basename(path)}\n{text}")
    return "\n".join(parts)


AGENT_PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
               "metrics-export-port")


def start_node(args: list[str], env: dict, temp: str, ports: tuple[str, ...] = (), tries: int = 3) -> dict[str, int]:
    """`ray start` one node (head or worker) with its temp folder `temp`; returns the ports it was given.

    `ports` names the `ray start` flags (without `--`) that take a port picked here, fresh on each try, besides
    the agents' ports, e.g. ("port", "dashboard-port") for a head."""
    failures = []
    for attempt in range(1, tries + 1):
        chosen = {name: free_port() for name in (*ports, *AGENT_PORTS)}
        cmd = [RAY, "start", *args, "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
               *(f"--{name}={port}" for name, port in chosen.items()), "--disable-usage-stats"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        if out.returncode == 0:
            return chosen
        detail = (f"`ray start` exited {out.returncode} (try {attempt} of {tries}, ports {chosen})\n"
                  f"stdout: {out.stdout[-2000:]}\nstderr: {out.stderr[-2000:]}\n{_log_tails(temp)}")
        failures.append(detail)
        kill_cluster(temp)  # whatever half-started, before fresh ports are tried
        if attempt < tries:
            warnings.warn(f"retrying a Ray node start on fresh ports: {detail}")
    raise RuntimeError("\n\n".join(failures))
