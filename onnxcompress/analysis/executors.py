"""Where the sweep's tasks run: this process, a spawn process pool (`--jobs N`), or a Ray cluster
(`--executor ray`; the payload travels once through the object store). Generic over the task functions."""
from __future__ import annotations

import sys
import time
from typing import Callable

from ..errors import UserError
from .cache import sha256


class Bar:
    """A one-line progress bar on stderr (TTY only), no dependency."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.t0 = total, enabled, time.perf_counter()

    def update(self, done: int, cached: int) -> None:
        if not self.enabled or not self.total:
            return
        frac = done / self.total
        n = int(30 * frac)
        el = time.perf_counter() - self.t0
        run = done - cached
        eta = (el / run * (self.total - done)) if run > 0 else 0.0
        sys.stderr.write(f"\r  analyze [{'#' * n}{'.' * (30 - n)}] {done}/{self.total} tasks "
                         f"({cached} cached)  {el:5.0f}s elapsed, eta {eta:4.0f}s ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.total:
            sys.stderr.write("\n")
            sys.stderr.flush()


def execute(todo: list[tuple[str, dict]], payload: bytes, jobs: int, executor: str,
            on_done: Callable[[str, dict], None], init: Callable[[bytes], None], run: Callable[[dict], dict],
            ray_run: Callable[[list, dict], dict]) -> None:
    """Run `todo` [(key, task)]: `init(payload)` once per worker, then `run(task)` per task (module-level
    functions, so they pickle by reference; `ray_run([payload ref], task)` on Ray); `on_done(key, result)` in
    this process as tasks finish.
    `executor`: "local" (this process with jobs=1, else a spawn process pool) or "ray"."""
    if not todo:
        return
    if executor == "ray":
        _execute_ray(todo, payload, jobs, on_done, ray_run)
    elif jobs <= 1:
        init(payload)
        for key, task in todo:
            on_done(key, run(task))
    else:
        _execute_pool(todo, payload, jobs, on_done, init, run)


def _execute_pool(todo, payload, jobs, on_done, init, run) -> None:
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ex = ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=mp.get_context("spawn"),
                             initializer=init, initargs=(payload,))
    procs = []
    try:
        with _workers_without_main():   # the workers start on the first submits
            pending = {ex.submit(run, task): key for key, task in todo}
        procs = list((getattr(ex, "_processes", None) or {}).values())
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                on_done(pending.pop(fut), fut.result())
    except BaseException:
        procs = procs or list((getattr(ex, "_processes", None) or {}).values())
        ex.shutdown(wait=False, cancel_futures=True)
        for p in procs:   # our own workers only
            p.terminate()
        raise
    ex.shutdown(wait=True)


class _workers_without_main:
    """Spawned workers import the parent's ``__main__`` (to unpickle functions defined there): a user's script
    calling onnxcompress without an ``if __name__ == "__main__":`` guard would then run again in every worker
    (and fail there). The task functions live in this package, so the workers are started with ``__main__``
    looking like an interactive session (no file, no spec); restored right after."""

    def __enter__(self):
        self.main = sys.modules.get("__main__")
        self.saved = {k: self.main.__dict__[k] for k in ("__file__", "__spec__")
                      if self.main is not None and k in self.main.__dict__}
        for k in self.saved:
            setattr(self.main, k, None) if k == "__spec__" else delattr(self.main, k)
        return self

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            setattr(self.main, k, v)
        return False


def ray_available() -> str | None:
    """None when Ray can be imported, else why not."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return "--executor ray needs Ray, which is not installed: pip install 'ray>=2' (or use --executor local)"
    return None


def _execute_ray(todo, payload, jobs, on_done, ray_run) -> None:
    why = ray_available()
    if why:
        raise UserError(why)
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=max(1, jobs), include_dashboard=False, log_to_driver=False,
                 configure_logging=False, ignore_reinit_error=True)
        started = True
    try:
        ref = ray.put(payload)                  # the model bytes travel once, through the object store
        remote = ray.remote(num_cpus=1)(ray_run)
        pkey = sha256(payload)
        pending = {remote.remote([ref], {**task, "payload_key": pkey}): key for key, task in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for r in ready:
                on_done(pending.pop(r), ray.get(r))
    except BaseException:
        for r in list(locals().get("pending", {})):
            ray.cancel(r, force=True)
        raise
    finally:
        if started:
            ray.shutdown()
