"""What the benchmarks share: launching a script under torchrun, and interleaved repeats reduced to medians."""
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def torchrun(nproc, *args):
    """Runs `torchrun --standalone --nproc_per_node=nproc args` in the repo; exits with its stderr if it fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")


def interleaved(methods, repeats, run_one):
    """Runs `run_one(method, repeat) -> dict of numbers` for every method, `repeats` rounds interleaved (so slow
    drifts of the machine hit every method alike); returns (all runs, per-method medians of each number)."""
    runs = {m: [] for m in methods}
    for repeat in range(repeats):
        for method in runs:
            print(f"run {repeat + 1}/{repeats}: {method} ...", file=sys.stderr, flush=True)
            runs[method].append(run_one(method, repeat))
    medians = {m: {k: None if rs[0][k] is None else statistics.median(r[k] for r in rs) for k in rs[0]}
               for m, rs in runs.items()}
    return runs, medians
