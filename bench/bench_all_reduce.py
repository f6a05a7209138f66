"""Benchmark: DDP against every --sync mode of all_reduce_train.py on the same settings, beside the backend's
own all-reduce of one flat buffer the size of the model's gradients (and of its tensors one by one).

    flock /tmp/cpu.lock python bench/bench_all_reduce.py --write bench/RESULTS_all_reduce.md

Each training run: torchrun, 4 processes, gloo on CPU, ResNet50 on the sample dataset, 1 epoch of
--max-steps steps (the first left out as warm-up). Prints a markdown table of per-step time, communication
time and throughput, with ratios to DDP (and communication to the raw flat all-reduce).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchlib import REPO, interleaved, measure_raw, report, torchrun

MODES = ("per-param", "bucketed", "overlap", "ring")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--nproc", type=int, default=4, help="training processes")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch-size", type=int, default=64, help="images per step per process")
    p.add_argument("--methods", default=",".join(("ddp",) + MODES), help="comma-separated subset to run")
    p.add_argument("--max-steps", type=int, default=8, help="training steps per run (the first is warm-up)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each method, interleaved; the table shows each method's median")
    p.add_argument("--out-dir", default="/tmp/bench_all_reduce", help="where the runs' results JSON go")
    p.add_argument("--write", default=None, help="also write the table (markdown) to this file")
    p.add_argument("--raw", default=None, help=argparse.SUPPRESS)  # internal: the raw all-reduce worker's output
    return p.parse_args(argv)


def raw_worker(args):
    """Under torchrun: median time of one all_reduce of a flat buffer the size of the model's gradients, of
    the same gradients as separate tensors one by one, and of GradSync.finish() per blocking mode, all
    barrier-synchronized (so, unlike in training, no rank waits for a slower rank's backward)."""
    import torch
    import torch.distributed as dist
    from torchvision import models
    sys.path.insert(0, str(REPO))
    import common
    from all_reduce_train import GradSync
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    model = models.get_model(args.arch, num_classes=10)  # the sample dataset's 10 classes, as in training
    params = list(model.parameters())
    grads = [torch.randn_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    cpu = flat.device
    times = {"flat": common.median_time(lambda: dist.all_reduce(flat), 5, cpu),
             "per_tensor": common.median_time(lambda: [dist.all_reduce(g) for g in grads], 3, cpu)}
    for mode in ("per-param", "bucketed", "ring"):
        sync = GradSync(model, mode)

        def step():
            for p, g in zip(params, grads):
                p.grad = g  # fresh gradients, as after backward with zero_grad(set_to_none=True)
            sync.finish()
        times[f"finish_{mode}"] = common.median_time(step, 3, cpu)
    if dist.get_rank() == 0:
        Path(args.raw).write_text(json.dumps({**times, "tensors": len(grads),
                                              "bytes": flat.numel() * flat.element_size()}))
    dist.destroy_process_group()


def run_training(method, args, out):
    common_args = ["--epochs", 1, "--max-steps", args.max_steps, "--batch-size", args.batch_size, "--arch", args.arch,
                   "--workers", 0, "--backend", "gloo", "--output", out]
    if method == "ddp":
        torchrun(args.nproc, "baseline_multi_card.py", *common_args, "--calib-steps", 2)
    else:
        torchrun(args.nproc, "all_reduce_train.py", *common_args, "--sync", method)
    data = json.loads(Path(out).read_text())
    e = data["epochs"][0]
    return {"step": e["avg_batch_time"], "comm": e.get("avg_comm_time"), "comm_op": e.get("avg_comm_op_time"),
            "throughput": e["train_throughput"]}


def table(rows, raw, args):
    ddp = rows.get("ddp") or next(iter(rows.values()))
    ms = lambda s: "-" if s is None else f"{1e3 * s:.0f}"
    lines = ["| method | step (ms) | step vs DDP | comm wait (ms) | comm ops (ms) | comm vs raw flat | "
             "throughput (img/s) | throughput vs DDP |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        label = "DDP (baseline)" if name == "ddp" else f"`--sync {name}`"
        vs_raw = "-" if r["comm"] is None else f"{r['comm'] / raw['flat']:.2f}x"
        lines.append(f"| {label} | {ms(r['step'])} | {r['step'] / ddp['step']:.2f}x | {ms(r['comm'])} | "
                     f"{ms(r['comm_op'])} | {vs_raw} | {r['throughput']:.1f} | {r['throughput'] / ddp['throughput']:.2f}x |")
    lines.append(f"| raw `all_reduce`, one flat buffer ({raw['bytes'] / 1e6:.0f} MB) | - | - | - | {ms(raw['flat'])} "
                 f"| 1.00x | - | - |")
    lines.append(f"| raw `all_reduce`, {raw['tensors']} tensors one by one | - | - | - | {ms(raw['per_tensor'])} | "
                 f"{raw['per_tensor'] / raw['flat']:.2f}x | - | - |")
    for mode in ("per-param", "bucketed", "ring"):
        t = raw[f"finish_{mode}"]
        lines.append(f"| `--sync {mode}` sync alone, no training (`GradSync.finish()`, barrier first) | - | - | - | "
                     f"{ms(t)} | {t / raw['flat']:.2f}x | - | - |")
    return "\n".join(lines)


def main():
    args = parse_args()
    if args.raw:
        return raw_worker(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    raw = measure_raw(__file__, args.nproc, args.arch, out_dir)
    runs, rows = interleaved(args.methods.split(","), args.repeats,
                             lambda m, r: run_training(m, args, out_dir / f"{m}_{r}.json"))
    header = (f"{args.nproc} processes, gloo on CPU ({os.cpu_count()} cores), {args.arch} on the sample dataset "
              f"(32px), batch {args.batch_size}/process, {args.max_steps} steps ({args.max_steps - 1} timed), "
              f"median of {args.repeats} interleaved runs; took {time.time() - t0:.0f}s")
    text = f"{header}\n\n{table(rows, raw, args)}\n"
    report(text, out_dir, args.write, raw=raw, runs=runs)


if __name__ == "__main__":
    main()
