"""Peak memory on CPU for the benchmarks: the resident set size sampled in a background thread, and freed memory
handed back to the OS between the sides."""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set size every `interval` s in a background thread; `.peak` is the maximum seen."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def free_memory(device: torch.device) -> None:
    """Collect garbage and hand freed heap back to the OS so the next side's RSS baseline is honest."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
