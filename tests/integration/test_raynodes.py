"""The cluster tests' `ray start` helper survives the failure stop 31's CI met: a port picked free and taken
before Ray's GCS binds it fails `ray start --head` (exit 1); the helper retries on fresh ports and says why."""
import os
import socket
import tempfile

import pytest

from tests import raynodes

pytestmark = pytest.mark.integration


def test_a_head_whose_port_is_taken_starts_on_fresh_ports_and_says_why(monkeypatch):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()  # another process's listener on the port the first try is given
    port, real = taken.getsockname()[1], raynodes.free_port
    picks = iter([port])  # the first pick is the taken port, every later one a real free port
    monkeypatch.setattr(raynodes, "free_port", lambda: next(picks, None) or real())
    temp = tempfile.mkdtemp(prefix="rayn", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        with pytest.warns(UserWarning, match="try 1 of 2") as seen:
            ports = raynodes.start_node(["--head", "--num-cpus=1", "--include-dashboard=false"], env, temp,
                                        ("port",), tries=2)
        assert ports["port"] != port
        detail = str(seen[0].message)
        assert f"'port': {port}" in detail and "exited 1" in detail
        assert "Failed to start" in detail  # Ray's own words (its GCS could not bind), not just an exit code
        with socket.create_connection(("127.0.0.1", ports["port"]), timeout=10):
            pass  # the retried head's GCS is up on its fresh port
    finally:
        raynodes.kill_cluster(temp)
        taken.close()
