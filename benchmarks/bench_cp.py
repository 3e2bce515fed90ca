"""Benchmark CP4 (ALS + EPC) on the ResNet-18 3×3 conv shapes, and against tensorly's parafac.

    python benchmarks/bench_cp.py [--quick] [--ratio 4] [--iters N] [--epc-rounds N] [--threads N]

Kernels are random normal (seeded). Prints per-layer seconds, rel. error, κ before/after EPC,
the total, the peak RSS, and a speed ratio against ``tensorly.decomposition.parafac`` on one
mid-size kernel with the same rank, init and number of iterations.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one layer per distinct shape, no 512x512")
    p.add_argument("--ratio", type=float, default=4.0, help="compression ratio P0/P_CP4")
    p.add_argument("--iters", type=int, default=None, help="ALS sweeps (default: cp_kernel's)")
    p.add_argument("--epc-rounds", type=int, default=None, help="EPC rounds (default: cp_kernel's)")
    p.add_argument("--tl-iters", type=int, default=None, help="iterations for the tensorly comparison")
    p.add_argument("--no-tensorly", action="store_true")
    p.add_argument("--float64", action="store_true", help="float64 GEMMs (default float32, as cp_kernel)")
    p.add_argument("--threads", type=int, default=None, help="BLAS threads (set before numpy loads)")
    return p.parse_args()


ARGS = _parse()
if ARGS.threads is not None:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import resource  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from onnxcompress.decompose import cp as cpmod  # noqa: E402

# ResNet-18 3×3 convs (stem excluded): (T, S, count)
DTYPE = np.float64 if ARGS.float64 else np.float32
RESNET18_3X3 = [(64, 64, 4), (128, 64, 1), (128, 128, 3), (256, 128, 1), (256, 256, 3), (512, 256, 1), (512, 512, 3)]
QUICK = [(64, 64, 1), (128, 64, 1), (128, 128, 1), (256, 128, 1), (256, 256, 1)]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_resnet(shapes, ratio: float, iters: int, rounds: int) -> float:
    rng = np.random.default_rng(0)
    print(f"{'layer':>16} {'R':>5} {'als_s':>7} {'epc_s':>7} {'its':>4} {'rnds':>4} "
          f"{'rel_err':>8} {'err_epc':>8} {'kappa':>6} {'k_epc':>6}")
    total = 0.0
    cpu0 = time.process_time()
    for t, s, count in shapes:
        for i in range(count):
            k = rng.standard_normal((t, s, 3, 3)) * np.sqrt(2.0 / (s * 9))
            r = cpmod.cp4_rank_for_ratio(t, s, 3, 3, ratio)
            t0 = time.perf_counter()
            als = cpmod.cp_als(k, r, init="svd", n_iter_max=iters, tol=cpmod.DEFAULT_KERNEL_TOL, random_state=0,
                               dtype=DTYPE)
            t1 = time.perf_counter()
            res = cpmod.epc(k, als, n_rounds=rounds, dtype=DTYPE)
            t2 = time.perf_counter()
            total += t2 - t0
            print(f"{f'{t}x{s}x3x3#{i}':>16} {r:5d} {t1 - t0:7.2f} {t2 - t1:7.2f} {als.n_iter:4d} "
                  f"{res.n_iter:4d} {als.rel_error:8.4f} {res.rel_error:8.4f} {als.kappa:6.2f} {res.kappa:6.2f}")
    print(f"total {total:.1f} s wall, {time.process_time() - cpu0:.1f} s CPU   peak RSS {_rss_mb():.0f} MB   "
          f"(load avg at end {os.getloadavg()[0]:.1f})")
    return total


def run_tensorly(t: int, s: int, ratio: float, iters: int) -> None:
    import warnings

    import tensorly as tl
    from tensorly.decomposition import parafac

    k = np.random.default_rng(1).standard_normal((t, s, 3, 3))
    r = cpmod.cp4_rank_for_ratio(t, s, 3, 3, ratio)
    t0 = time.perf_counter()
    ours = cpmod.cp_als(k, r, init="svd", n_iter_max=iters, tol=0.0, random_state=0, linesearch=False)
    t_ours = time.perf_counter() - t0
    tl.set_backend("numpy")
    warnings.filterwarnings("ignore", message="Trying to compute SVD")
    t0 = time.perf_counter()
    cpt = parafac(tl.tensor(k), r, n_iter_max=iters, init="svd", tol=0.0, normalize_factors=True, random_state=0)
    t_tl = time.perf_counter() - t0
    tl_err = float(np.linalg.norm(k - tl.cp_to_tensor(cpt)) / np.linalg.norm(k))
    print(f"\ntensorly parafac vs cp_als on {t}x{s}x3x3, R={r}, {iters} iterations, svd init:")
    print(f"  tensorly {t_tl:7.2f} s  rel_err {tl_err:.4f}")
    print(f"  cp_als   {t_ours:7.2f} s  rel_err {ours.rel_error:.4f}  ({ours.n_iter} sweeps)")
    print(f"  speed ratio {t_tl / t_ours:.1f}x   peak RSS {_rss_mb():.0f} MB")


def main() -> int:
    iters = ARGS.iters if ARGS.iters is not None else cpmod.DEFAULT_KERNEL_ITERS
    rounds = ARGS.epc_rounds if ARGS.epc_rounds is not None else cpmod.DEFAULT_EPC_ROUNDS
    shapes = QUICK if ARGS.quick else RESNET18_3X3
    print(f"CP4 + EPC, ratio {ARGS.ratio}, ALS <= {iters} sweeps (tol {cpmod.DEFAULT_KERNEL_TOL}), "
          f"EPC <= {rounds} rounds, {np.dtype(DTYPE).name} GEMMs, "
          f"BLAS threads {os.environ.get('OPENBLAS_NUM_THREADS', 'default')}")
    run_resnet(shapes, ARGS.ratio, iters, rounds)
    if not ARGS.no_tensorly:
        tl_iters = ARGS.tl_iters if ARGS.tl_iters is not None else (10 if ARGS.quick else 30)
        run_tensorly(128, 128, ARGS.ratio, tl_iters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
