"""Headless Chromium (Debian's `chromium`) for tests of what people look at: the DOM after scripts ran,
and a screenshot. `make test` installs it; a missing browser fails the test (what people look at would go
untested otherwise)."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
        "--virtual-time-budget=5000"]


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed: `make test` installs it (apt-get install -y chromium)")
    return exe


def dump_dom(path: str) -> str:
    """The page's DOM after load (and its scripts) as HTML."""
    out = subprocess.run([chromium(), *ARGS, "--dump-dom", f"file://{path}"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def screenshot(path: str, png: str, size: str = "1280,1600") -> str:
    out = subprocess.run([chromium(), *ARGS, f"--screenshot={png}", f"--window-size={size}", f"file://{path}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and os.path.exists(png), out.stderr[-2000:]
    return png
