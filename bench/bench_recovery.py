"""Benchmark: what surviving failures costs. Prints markdown tables.

    flock /tmp/bench.lock python bench/bench_recovery.py cost                 # checkpoints' share of the loop
    flock /tmp/bench.lock python bench/bench_recovery.py recovery             # kill -> first step, loopback
    sudo flock /tmp/bench.lock python bench/bench_recovery.py recovery --cluster 4x1 --rate 1gbit

cost: DDP on 4 processes, each workload without checkpoints, with a checkpoint per epoch (--resume), and with
--checkpoint-every 200 and 50 (steps over the whole run), repeats interleaved; the checkpoints' share of the training
loop is sum(checkpoint_time) / sum(train_time) from the results, and the throughput is compared with the run
without checkpoints. Workloads: the sample recipe (sample_recipe.env, ResNet-18) and --synthetic ResNet-50 at 32 px.
recovery: DDP under torchrun --max-restarts 1 (or emulate_cluster.sh --max-restarts 1), a checkpoint every 20
steps (80 in all); rank 1 is killed (SIGKILL) after step 30; the restart record gives the time from the restarted process's
start to its first step, and the bench adds the time from the kill to that first step and the steps redone.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from modes import sample_args  # noqa: E402

WORKLOADS = {
    "sample recipe (ResNet-18, 14 epochs of 8 steps)": [*sample_args(), "--workers", "1"],
    # 8 steps an epoch (the sample set's 960 images over 4 x 32): 25 epochs of 8 steps
    "synthetic ResNet-50 (200 steps)": ["--synthetic", "--arch", "resnet50", "--image-size", "32", "--batch-size",
                                        "32", "--epochs", "25", "--workers", "0"],
}
SETTINGS = {"none": [], "per epoch": ["--resume"], "every 200 steps": ["--checkpoint-every", "200"],
            "every 50 steps": ["--checkpoint-every", "50"]}


def launch(script_args, args, out, restarts=0):
    """torchrun (loopback) or emulate_cluster.sh (--cluster) running baseline_multi_card.py."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    script = [str(REPO / "baseline_multi_card.py"), *script_args, "--overhead-pairs", "0", "--output", str(out)]
    if args.cluster:
        nodes, per_node = args.cluster.split("x")
        cmd = ["bash", str(REPO / "emulate_cluster.sh"), "run", "--name", "benchrec", "--nodes", nodes, "--rate",
               args.rate, "--nproc-per-node", per_node, "--max-restarts", str(restarts), "--logs",
               str(out.parent / f"logs_{out.stem}"), "--", *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
               f"--max_restarts={restarts}", *script]
    return subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def finish(proc, what):
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"{what} failed ({proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}")


def cost(args):
    rows = {(w, s): [] for w in WORKLOADS for s in SETTINGS}
    for repeat in range(args.repeats):
        for workload, base in WORKLOADS.items():
            for setting, flags in SETTINGS.items():
                out = Path(args.out_dir) / f"cost_{len(rows)}_{abs(hash((workload, setting))) % 10 ** 6}_{repeat}.json"
                for old in (out, out.with_name(out.stem + ".ckpt")):
                    subprocess.run(["rm", "-rf", str(old)])
                print(f"{time.strftime('%H:%M:%S')} repeat {repeat + 1}: {workload}, {setting}", file=sys.stderr,
                      flush=True)
                finish(launch([*base, *flags], args, out), f"{workload} {setting}")
                d = json.loads(out.read_text())
                loop = sum(e["train_time"] for e in d["epochs"])
                rows[(workload, setting)].append({
                    "loop": loop, "checkpoint": sum(e.get("checkpoint_time", 0.0) for e in d["epochs"]),
                    "count": sum(e.get("checkpoints", 0) for e in d["epochs"]),
                    "throughput": statistics.mean(e["train_throughput"] for e in d["epochs"])})
    lines = ["| workload | checkpoints | written | checkpoint time (s) | training loop (s) | share of the loop | "
             "img/s | vs none |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for workload in WORKLOADS:
        base = statistics.median(r["throughput"] for r in rows[(workload, "none")])
        for setting in SETTINGS:
            runs = rows[(workload, setting)]
            med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
            lines.append(f"| {workload} | {setting} | {med('count'):.0f} | {med('checkpoint'):.2f} | "
                         f"{med('loop'):.1f} | {100 * med('checkpoint') / med('loop'):.1f}% | "
                         f"{med('throughput'):.1f} | {med('throughput') / base:.3f}x |")
    return "\n".join(lines)


def _rank_pid(out, rank):
    """The training process of rank `rank` writing to `out` (loopback or inside an emulated node)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if str(out).encode() in cmdline and b"torch.distributed.run" not in cmdline and \
                f"\0RANK={rank}\0".encode() in b"\0" + environ and b"TORCHELASTIC_RESTART_COUNT=0\0" in environ:
            return int(pid)
    return None


def recovery(args):
    base = [*WORKLOADS["synthetic ResNet-50 (200 steps)"], "--epochs", "10", "--checkpoint-every", "20",
            "--log-every", "1"]
    lines = ["| where | killed after step | resumed from step | steps redone | process start -> first step (s) | "
             "kill -> first step (s) | seconds lost |", "|---|---:|---:|---:|---:|---:|---:|"]
    for repeat in range(args.repeats):
        out = Path(args.out_dir) / f"recovery_{repeat}.json"
        for old in (out, out.with_name(out.stem + ".ckpt")):
            subprocess.run(["rm", "-rf", str(old)])
        # 2 restarts allowed: on the emulated cluster, the node restarted only to re-join sees torchrun's restart
        # count 0 and takes one more round (README, the emulated cluster)
        proc = launch(base, args, out, restarts=2)
        progress = out.with_name(out.stem + ".ckpt") / "progress"
        while True:
            try:
                step = int(progress.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                step = -1
            if step >= 30 and _rank_pid(out, 1):
                break
            if proc.poll() is not None:
                sys.exit("the run ended before step 30:\n" + proc.communicate()[1][-3000:])
            time.sleep(0.02)
        os.kill(_rank_pid(out, 1), signal.SIGKILL)
        killed = time.time()
        finish(proc, "recovery run")
        r = json.loads(out.read_text())["restarts"][-1]  # the attempt that trained
        lines.append(f"| {args.cluster + ' at ' + args.rate if args.cluster else 'loopback, 4 processes'} | {step} | "
                     f"{r['resumed_from_step']} | {r.get('steps_redone', '-')} | {r['seconds_to_first_step']:.1f} | "
                     f"{r['first_step_unix_time'] - killed:.1f} | {r.get('seconds_lost', float('nan')):.1f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("what", choices=("cost", "recovery"))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--cluster", default=None, help="NODESxPROCS on an emulated cluster (recovery; needs root)")
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--out-dir", default="/tmp/bench_recovery")
    p.add_argument("--write", default=None, help="also append the table to this file")
    args = p.parse_args()
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    start = time.time()
    table = cost(args) if args.what == "cost" else recovery(args)
    text = (f"`python bench/bench_recovery.py {args.what}{f' --cluster {args.cluster} --rate {args.rate}' if args.cluster else ''}"
            f" --repeats {args.repeats}` (took {time.time() - start:.0f} s)\n\n{table}\n")
    print(text)
    if args.write:
        with open(args.write, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
