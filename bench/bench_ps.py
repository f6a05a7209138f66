"""Benchmark: the PS server's per-step aggregation + update time, before and after a change, as a ratio.

    flock /tmp/cpu.lock python bench/bench_ps.py --before b022be8 --write /tmp/bench_ps.md

Runs ps_train.py of the git ref --before (exported to a temporary directory) and of this working tree with the
same settings (loopback, --nproc processes: one server and the rest workers; --synthetic ResNet50 at 32 px, the
first --warmup-steps left out), each --comm in turn, the repeats interleaved, and compares the results' own
`avg_server_update_time` (the server's time from holding every worker's gradient to having updated its
parameters: averaging the gradients and the optimizer step) and the throughput.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMS = ("collective", "p2p", "overlap")


def run(tree, comm, args, out):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           str(tree / "ps_train.py"), "--synthetic", "--arch", "resnet50", "--image-size", "32",
           "--batch-size", str(args.batch_size), "--epochs", "1", "--max-steps", str(args.max_steps),
           "--warmup-steps", "2", "--workers", "0", "--comm", comm, "--output", str(out)]
    proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    epoch = json.loads(out.read_text())["epochs"][-1]
    return epoch["avg_server_update_time"], epoch["train_throughput"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--before", default="b022be8", help="the git ref to compare against")
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--write", default=None, help="also write the table (markdown) to this file")
    args = p.parse_args()
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        before.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.before], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive.stdout, check=True)
        rows = {(c, t): [] for c in COMMS for t in ("before", "after")}
        for repeat in range(args.repeats):
            for comm in COMMS:
                for label, tree in (("before", before), ("after", REPO)):
                    print(f"{time.strftime('%H:%M:%S')} repeat {repeat + 1}: {comm} {label}", file=sys.stderr)
                    rows[comm, label].append(run(tree, comm, args, Path(tmp) / f"{comm}_{label}_{repeat}.json"))
    lines = [f"`python bench/bench_ps.py --before {args.before}` (loopback, {args.nproc} processes, --synthetic "
             f"ResNet50 32 px, batch {args.batch_size}, {args.max_steps} steps; medians over {args.repeats} "
             f"interleaved repeats; took {time.time() - start:.0f} s)", "",
             "| --comm | server update before (ms) | after (ms) | after / before | img/s before | img/s after |",
             "|---|---:|---:|---:|---:|---:|"]
    for comm in COMMS:
        (ub, tb), (ua, ta) = ([statistics.median(x[i] for x in rows[comm, t]) for i in (0, 1)]
                              for t in ("before", "after"))
        lines.append(f"| {comm} | {1e3 * ub:.1f} | {1e3 * ua:.1f} | {ua / ub:.2f}x | {tb:.1f} | {ta:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        Path(args.write).write_text(text)


if __name__ == "__main__":
    main()
