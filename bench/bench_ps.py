"""Benchmark: every --comm of ps_train.py against DDP on the same settings, beside the backend's raw flat
broadcast + reduce of the model's state and the raw per-parameter send/recv loops of the guide's original.

    flock /tmp/cpu.lock python bench/bench_ps.py --write /tmp/bench_ps/table.md

Each training run: torchrun, 4 processes (PS: 1 server + 3 workers), gloo on CPU, ResNet50 on the sample
dataset, 1 epoch of --max-steps steps (the first left out as warm-up). Prints a markdown table of the workers'
pull and push wait per step, the server's update time and throughput, with ratios to p2p and to DDP.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchlib import REPO, interleaved, measure_raw, report, torchrun

COMMS = ("p2p", "collective", "overlap")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--nproc", type=int, default=4, help="processes (PS: one server, the rest workers)")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch-size", type=int, default=64, help="images per step per training process")
    p.add_argument("--max-steps", type=int, default=6, help="training steps per run (the first is warm-up)")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of each method, interleaved; the table shows each method's median")
    p.add_argument("--out-dir", default="/tmp/bench_ps", help="where the runs' results JSON go")
    p.add_argument("--write", default=None, help="also write the table (markdown) to this file")
    p.add_argument("--raw", default=None, help=argparse.SUPPRESS)  # internal: the raw exchange worker's output
    return p.parse_args(argv)


def raw_worker(args):
    """Under torchrun: median time of the PS exchange of the model's state with nothing else running:
    one flat dist.broadcast + one flat dist.reduce (rank 0 the root), and the guide's per-parameter loops
    (rank 0 sends every tensor to every worker, then receives every tensor from every worker)."""
    import torch
    import torch.distributed as dist
    from torchvision import models
    sys.path.insert(0, str(REPO))
    import common
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = models.get_model(args.arch, num_classes=10)  # the sample dataset's 10 classes, as in training
    tensors = [torch.randn_like(p) for p in model.parameters()]
    flat = torch.cat([t.reshape(-1) for t in tensors])

    def flat_exchange():
        dist.broadcast(flat, src=0)
        dist.reduce(flat, dst=0)

    def per_param():
        for t in tensors:
            if rank == 0:
                for w in range(1, world):
                    dist.send(t, dst=w)
            else:
                dist.recv(t, src=0)
        for t in tensors:
            if rank == 0:
                for w in range(1, world):
                    dist.recv(t, src=w)
            else:
                dist.send(t, dst=0)

    flat_s = common.median_time(flat_exchange, 5, flat.device)
    per_param_s = common.median_time(per_param, 3, flat.device)
    if rank == 0:
        Path(args.raw).write_text(json.dumps({"flat": flat_s, "per_param": per_param_s, "tensors": len(tensors),
                                              "bytes": flat.numel() * flat.element_size()}))
    dist.destroy_process_group()


def run_training(method, args, out):
    common_args = ["--epochs", 1, "--max-steps", args.max_steps, "--batch-size", args.batch_size, "--arch", args.arch,
                   "--workers", 0, "--backend", "gloo", "--output", out]
    if method == "ddp":
        torchrun(args.nproc, "baseline_multi_card.py", *common_args, "--calib-steps", 2)
    else:
        torchrun(args.nproc, "ps_train.py", *common_args, "--comm", method)
    e = json.loads(Path(out).read_text())["epochs"][0]
    return {"step": e["avg_batch_time"], "pull": e.get("avg_comm_time_pull"), "push": e.get("avg_comm_time_push"),
            "comm": e.get("avg_comm_time"), "update": e.get("avg_server_update_time"),
            "compute": e.get("avg_compute_time"), "throughput": e["train_throughput"]}


def table(rows, raw):
    ddp, p2p = rows["ddp"], rows["p2p"]
    ms = lambda s: "-" if s is None else f"{1e3 * s:.0f}"
    lines = ["| method | step (ms) | pull wait (ms) | push wait (ms) | comm wait pull+push (ms) | comm vs p2p | "
             "worker compute (ms) | server update (ms) | throughput (img/s) | throughput vs DDP |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        label = "DDP (baseline, exposed comm from its calibration)" if name == "ddp" else f"PS `--comm {name}`"
        vs_p2p = "-" if name == "ddp" else f"{r['comm'] / p2p['comm']:.2f}x"
        lines.append(f"| {label} | {ms(r['step'])} | {ms(r['pull'])} | {ms(r['push'])} | {ms(r['comm'])} | {vs_p2p} | "
                     f"{ms(r['compute'])} | {ms(r['update'])} | {r['throughput']:.1f} | "
                     f"{r['throughput'] / ddp['throughput']:.2f}x |")
    lines.append(f"| raw flat `broadcast` + `reduce` ({raw['bytes'] / 1e6:.0f} MB each way) | - | - | - | "
                 f"{ms(raw['flat'])} | {raw['flat'] / raw['per_param']:.2f}x of raw per-param | - | - | - | - |")
    lines.append(f"| raw per-parameter `send`/`recv` loops ({raw['tensors']} tensors x workers, each way) | - | - | - | "
                 f"{ms(raw['per_param'])} | 1.00x | - | - | - | - |")
    return "\n".join(lines)


def main():
    args = parse_args()
    if args.raw:
        return raw_worker(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    raw = measure_raw(__file__, args.nproc, args.arch, out_dir)
    runs, rows = interleaved(("ddp", *COMMS), args.repeats,
                             lambda m, r: run_training(m, args, out_dir / f"{m}_{r}.json"))
    header = (f"{args.nproc} processes (PS: 1 server + {args.nproc - 1} workers), gloo on CPU ({os.cpu_count()} cores), "
              f"{args.arch} on the sample dataset (32px), batch {args.batch_size}/training process, "
              f"{args.max_steps} steps ({args.max_steps - 1} timed), median of {args.repeats} interleaved runs; "
              f"took {time.time() - t0:.0f}s")
    text = f"{header}\n\n{table(rows, raw)}\n"
    report(text, out_dir, args.write, raw=raw, runs=runs)


if __name__ == "__main__":
    main()
