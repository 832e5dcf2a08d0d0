"""Peak float32 matmul throughput of this CPU, to turn a model's MACs into a compute-bound latency floor.

Measured in a subprocess because BLAS libraries size their thread pool once, when numpy is imported:
the only reliable way to get "GFLOP/s with N threads" is a fresh interpreter whose OPENBLAS/OMP/MKL
thread variables say N. (OPENBLAS_CORETYPE, if set, is inherited untouched.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                          "VECLIB_MAXIMUM_THREADS", "BLIS_NUM_THREADS")


def compute_bound_ms(macs: float, batch: int, peak_gflops: float) -> float:
    """Latency floor in ms if every multiply-add ran at peak: 2 FLOPs per MAC."""
    if peak_gflops <= 0:
        raise ValueError(f"peak_gflops must be > 0, got {peak_gflops}")
    return 2.0 * macs * batch / (peak_gflops * 1e9) * 1e3


def measure_peak_gflops(threads: int, budget_s: float = 1.0, size: int = 1024) -> float:
    """Best-of-several SGEMM GFLOP/s with `threads` BLAS threads, in at most about `budget_s` seconds."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    env = dict(os.environ)
    env.update({name: str(threads) for name in _BLAS_THREAD_VARIABLES})
    command = [sys.executable, os.path.join(_HERE, "peak.py"), str(budget_s), str(size)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"SGEMM calibration failed with exit code {proc.returncode}: {tail}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["gflops"])


def _child_main(budget_s: float, size: int) -> int:
    import time

    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty((size, size), dtype=np.float32)
    np.matmul(a, b, out=out)  # warm-up: page in buffers, start BLAS threads
    best, start = float("inf"), time.perf_counter()
    while True:
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start >= budget_s:
            break
        if best > budget_s / 4 and size > 256:  # slow board: smaller matrices, so the budget holds
            size //= 2
            a, b, out = a[:size, :size].copy(), b[:size, :size].copy(), out[:size, :size].copy()
            best = float("inf")
    print(json.dumps({"gflops": 2.0 * size**3 / best / 1e9, "size": size}))
    return 0


if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    sys.exit(_child_main(float(sys.argv[1]), int(sys.argv[2])))
