"""(Benchmark helper.) Resident memory of this process, sampled in a background thread, attributed to named stages.

(Benchmark helper; no dependency beyond the standard library: reads ``/proc/self/status`` on Linux and falls
back to ``resource.getrusage`` peak elsewhere.)

    with RSSSampler(interval=0.01) as s:
        s.stage("load")
        ...
        s.stage("quantize")
        ...
    s.peaks    # {"load": MB, "quantize": MB}: the highest RSS seen while each stage was current
    s.peak_mb  # highest RSS seen overall (also the kernel's VmHWM, whichever is larger)
"""
from __future__ import annotations

import resource
import threading
import time
from contextlib import contextmanager


def rss_mb() -> float:
    """Current resident set size in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def hwm_mb() -> float:
    """The kernel's high-water mark of the resident set (VmHWM) in MiB, else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_hwm() -> bool:
    """Reset the kernel's VmHWM (Linux >= 4.0: write 5 to /proc/self/clear_refs); True when it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RSSSampler:
    def __init__(self, interval: float = 0.01, limit_mb: float | None = None):
        """`limit_mb`: when the RSS passes it, print a line to stderr and end the process (exit code 86):
        a guard for benchmarks on a shared machine."""
        self.interval = interval
        self.limit_mb = limit_mb
        self.peaks: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.order: list[str] = []
        self.current = "start"
        self._t = time.perf_counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak_mb = 0.0

    def _note(self, v: float) -> None:
        with self._lock:
            self.peaks[self.current] = max(self.peaks.get(self.current, 0.0), v)
            self.peak_mb = max(self.peak_mb, v)

    def _run(self) -> None:
        while not self._stop.is_set():
            v = rss_mb()
            self._note(v)
            if self.limit_mb and v > self.limit_mb:
                import os
                import sys

                sys.stderr.write(f"RSS limit: {v:.0f} MB > {self.limit_mb:.0f} MB during stage {self.current!r}\n")
                sys.stderr.flush()
                os._exit(86)
            time.sleep(self.interval)

    def stage(self, name: str) -> None:
        v = rss_mb()
        now = time.perf_counter()
        with self._lock:
            self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self._t
            self._t = now
            self.peaks[self.current] = max(self.peaks.get(self.current, 0.0), v)
            self.current = name
            if name not in self.order:
                self.order.append(name)
        self._note(v)

    @contextmanager
    def during(self, name: str):
        prev = self.current
        self.stage(name)
        try:
            yield
        finally:
            self.stage(prev)

    def __enter__(self) -> "RSSSampler":
        self._hwm_reset = reset_hwm()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stage("end")
        self._stop.set()
        self._thread.join()
        if self._hwm_reset:   # else VmHWM may predate the sampler
            self.peak_mb = max(self.peak_mb, hwm_mb())

    def table(self) -> list[tuple[str, float, float]]:
        return [(n, self.seconds.get(n, 0.0), self.peaks.get(n, 0.0)) for n in self.order if n != "end"]
