"""What the benchmarks share: launching a script under torchrun, and interleaved repeats reduced to medians."""
import json
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


def measure_raw(script, nproc, arch, out_dir):
    """Runs `script --raw` under torchrun (the backend's own floor, measured by the script's raw_worker)."""
    print(f"raw exchange ({nproc} processes) ...", file=sys.stderr, flush=True)
    torchrun(nproc, Path(script).resolve(), "--arch", arch, "--raw", Path(out_dir) / "raw.json")
    return json.loads((Path(out_dir) / "raw.json").read_text())


def report(text, out_dir, write=None, **data):
    """Prints the table, keeps every run's numbers in out_dir/runs.json, and also writes the table to `write`."""
    print(text)
    (Path(out_dir) / "runs.json").write_text(json.dumps(data, indent=2))
    if write:
        Path(write).write_text(text)
