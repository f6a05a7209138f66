"""Benchmark: the three methods side by side, with --synthetic data and with the real (sample) data loader.

    flock /tmp/cpu.lock python bench/bench_methods.py --write bench/RESULTS_methods.md

Each run: torchrun, 4 processes, gloo on CPU, ResNet50 at 32 px, batch 64 per process, 1 epoch of
--max-steps steps (the first left out as warm-up), default sync of each method. Prints throughput (and its
ratio to DDP), step time, the share of a step spent waiting for data, and the exposed communication.
With --synthetic the data wait should be near zero: the methods then differ only in their synchronization.
"""
import argparse
import json
import sys
from pathlib import Path

from benchlib import interleaved, torchrun
METHODS = {"DDP": ("baseline_multi_card.py", "--calib-steps", "2"),
           "manual all-reduce (overlap)": ("all_reduce_train.py",),
           "parameter server (collective)": ("ps_train.py",),
           "parameter server (overlap)": ("ps_train.py", "--comm", "overlap")}


def run(method, data_args, args, out):
    script, *own = METHODS[method]
    torchrun(args.nproc, script, *own, "--epochs", 1, "--max-steps", args.max_steps, "--arch", args.arch,
             "--image-size", 32, "--batch-size", 64, "--workers", 16, "--backend", "gloo", "--output", out, *data_args)
    e = json.loads(out.read_text())["epochs"][0]
    return {"thr": e["train_throughput"], "step": e["avg_batch_time"], "data": e["avg_data_time"],
            "comm": e.get("avg_comm_time")}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--max-steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2, help="runs of each, interleaved; the table shows medians")
    p.add_argument("--out-dir", default="/tmp/bench_methods")
    p.add_argument("--write", default=None, help="also write the markdown table to this file")
    args = p.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| data | method | throughput (img/s) | vs DDP | step (ms) | data wait (ms) | data share | "
             "exposed comm (ms) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for label, data_args in (("--synthetic", ["--synthetic"]), ("sample (ImageFolder)", [])):
        tag = "synthetic" if data_args else "sample"
        _, med = interleaved(METHODS, args.repeats,
                             lambda m, r: run(m, data_args, args, out / f"{tag}_{list(METHODS).index(m)}_{r}.json"))
        for m, r in med.items():
            comm = "-" if r["comm"] is None else f"{1e3 * r['comm']:.0f}"
            lines.append(f"| {label} | {m} | {r['thr']:.1f} | {r['thr'] / med['DDP']['thr']:.2f}x | "
                         f"{1e3 * r['step']:.0f} | {1e3 * r['data']:.1f} | {100 * r['data'] / r['step']:.1f}% | {comm} |")
        print(f"done: {label}", file=sys.stderr, flush=True)
    text = "\n".join(lines)
    print(text)
    if args.write:
        Path(args.write).write_text(f"`python bench/bench_methods.py` ({args.nproc} processes, {args.arch}, 32 px, "
                                    f"batch 64, {args.max_steps} steps, median of {args.repeats}):\n\n{text}\n")


if __name__ == "__main__":
    main()
