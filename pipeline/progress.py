"""Progress lines for long jobs, in logs as on terminals (Ray Data's own bars show on a terminal too).

A line at most every `every` seconds (ANOPLE_PROGRESS_SECONDS, default 30) and at the end, on stderr:
    score line1 2026-11-21: 12,000/50,000 rows (24.0%), 41.3 rows/s, ETA 15m20s
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, TextIO


def emit(line: str) -> None:
    """A line for the user from any process, once. In a Ray Train worker `print` goes through Ray's logger
    (INFO, and a second time when stdout is wrapped); the process's own stderr reaches the driver's console
    and the worker's log file exactly once."""
    print(line, file=sys.__stderr__, flush=True)


def every_seconds() -> float:
    return float(os.environ.get("ANOPLE_PROGRESS_SECONDS", "30"))


def duration(seconds: float) -> str:
    """62 -> '1m02s'; 3725 -> '1h02m'."""
    s = int(round(max(seconds, 0)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Counts done units of `total` and prints a rate and an ETA now and then."""

    def __init__(self, label: str, total: int, unit: str = "rows", every: float | None = None,
                 out: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
        self.label, self.total, self.unit = label, total, unit
        self.every = every_seconds() if every is None else every
        self.out, self.clock = out, clock
        self.start = self.last = clock()
        self.done = 0
        self.printed = -1  # `done` at the last line

    def line(self) -> str:
        elapsed = self.clock() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        pct = f" ({100 * self.done / self.total:.1f}%)" if self.total else ""
        eta = f", ETA {duration((self.total - self.done) / rate)}" if rate > 0 and self.done < self.total else ""
        return (f"{self.label}: {self.done:,}/{self.total:,} {self.unit}{pct}, {rate:.1f} {self.unit}/s, "
                f"elapsed {duration(elapsed)}{eta}")

    def update(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self._print()

    def finish(self) -> None:
        if self.printed != self.done:  # the last update's line may already say it
            self._print()

    def _print(self) -> None:
        self.printed = self.done
        print(self.line(), file=self.out or sys.stderr, flush=True)


def epoch_line(metrics: dict, total_epochs: int, seconds: list[float]) -> str:
    """One training epoch: losses, validation and an ETA for the epochs left (an upper bound: early stopping
    may end sooner)."""
    e = int(metrics["epoch"])
    parts = [f"epoch {e}/{total_epochs}", f"loss {metrics.get('loss_total', float('nan')):.4f}"]
    if "val_fused_pixel_auroc" in metrics:
        parts.append(f"val fused P-AUROC {100 * metrics['val_fused_pixel_auroc']:.1f} "
                     f"(best epoch {int(metrics.get('val_best_epoch', e))})")
    mean = sum(seconds) / len(seconds) if seconds else 0.0
    parts.append(f"{mean:.1f} s/epoch")
    if e < total_epochs:
        parts.append(f"ETA {duration(mean * (total_epochs - e))} at most")
    return "train: " + ", ".join(parts)
