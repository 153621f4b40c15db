"""The heap policy of the processes that run the model (pipeline.heap), checked in fresh processes: it is
process-wide, and the pytest process must not depend on it."""
import subprocess
import sys

import pytest

# allocate, touch and free a 64 MB block (above glibc's largest dynamic mmap threshold, 32 MB) five times,
# after a warm-up: the minor page faults it cost. Through malloc as torch's CPU tensors are, with transparent
# huge pages off for the process (PR_SET_THP_DISABLE), so that a kernel set to "always" counts 4 KB pages too
FAULTS = """
import ctypes, resource
libc = ctypes.CDLL("libc.so.6")
assert libc.prctl(41, 1, 0, 0, 0) == 0
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def touch():
    p = libc.malloc(64 << 20)
    ctypes.memset(p, 1, 64 << 20)
    libc.free(p)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = 5 * (64 << 20) // 4096  # what mmap-per-block costs: every page faulted in again


def _faults(setup: str) -> int:
    out = subprocess.run([sys.executable, "-c", setup + FAULTS], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


glibc = pytest.mark.skipif(__import__("pipeline.heap", fromlist=["_LIBC"])._LIBC is None, reason="not glibc")


@glibc
def test_large_blocks_kept_on_the_heap_are_reused_without_page_faults():
    assert _faults("") > PAGES // 2  # glibc's default: each 64 MB block is a fresh mmap, every page faulted in again
    assert _faults("from pipeline.heap import keep_large_blocks_on_heap as k\nassert k()\n") < PAGES // 50
    # the operator's way out: glibc's own policy
    assert _faults("import os\nos.environ['ANOPLE_HEAP_POLICY'] = 'default'\n"
                   "from pipeline.heap import keep_large_blocks_on_heap as k\nassert not k()\n") > PAGES // 2


@glibc
def test_a_scoring_actors_process_keeps_large_blocks_on_the_heap_and_trims_them_away():
    """The actor applies the policy in its constructor (its model is not under test here: a stand-in scorer),
    and release_freed_memory still hands the kept pages back. One process: importing pipeline.nightly.stages takes ~8 s."""
    code = ("import pipeline.nightly.stages as b\n"
            "b.Scorer.load = staticmethod(lambda *a, **k: type('S', (), {'device': 'cpu'})())\n"
            "b.ScoreActor('/nowhere', ['p'], b.RunInfo('d', 'm', '1', 'r'))\n"
            + FAULTS +
            "import numpy as np\n"
            "def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096\n"
            "a = np.ones(256 << 20, np.uint8); del a\n"
            "kept = rss()\n"
            "b.release_freed_memory()\n"
            "print(kept - rss())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    faults, released = int(out[-2]), int(out[-1])
    assert faults < PAGES // 50, faults
    assert released > 200 << 20, released
