"""Benchmark: the PS with servers of their own (BytePS's placement) against DDP on the same workers, on an emulated
cluster: N worker nodes x 1 process, plus k server nodes x 1 process for the PS (k = --servers-k).

    flock /tmp/cpu.lock python bench/bench_servers.py --workers 4 --servers-k 1 2 4 --rate 1gbit \
        --extra "--image-size 224 --compute-model flops:0.7" --write bench/RESULTS_servers.md

Every run is bench.py's SYNTHETIC (ResNet-50, batch 32, 8 steps, 2 untimed) with the yardstick. The table: each
k's throughput against DDP's, each worker's and each server's link bytes per step (measured, the busiest of each
role) against the BytePS bound (worker: the model once each way, M; server: n M / k each way) and the bound's time
max(M/B, nM/(kB)) against the ring's 2(n-1)M/(nB). --repeats R runs the whole list R times (repeat r > 1 into
results_<i>_r<r>.json) and prints each repeat's table, then each method's mean throughput against DDP's mean; under
each table, the PS workers' wait for pulls and pushes per step (phase_times). --ps-extra: flags for the PS runs only
(e.g. --bucket-mb 1).
"""
import statistics
import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import analysis  # noqa: E402
from analysis.links import byteps_bound  # noqa: E402
from bench import SYNTHETIC, figures, launch  # noqa: E402

EMU = str(REPO / "emulate_cluster.sh")


def experiments(args):
    """[(label, script, flags, server nodes)]: DDP on the n workers, then the PS with each k."""
    return [("DDP", "baseline_multi_card.py", [], 0)] + [
        (f"PS k={k}", "ps_train.py", ["--comm", "pipelined", "--server-ranks", str(k), *args.ps_extra.split()], k)
        for k in args.servers_k]


def run(args, label, script, flags, k, out):
    """One run on the first n + k nodes of the cluster; its results."""
    cmd = ["bash", EMU, "torchrun", "--name", args.name, "--nodes", str(args.workers + k), "--server-nodes", str(k),
           "--logs", str(out.parent / "logs" / out.stem), "--", str(REPO / script), *SYNTHETIC,
           "--overhead-pairs", str(args.pairs), *flags, *args.extra.split(), "--output", str(out)]
    print(f"{time.strftime('%H:%M:%S')} {label}", file=sys.stderr, flush=True)
    return launch(cmd, out)


def row(label, r, base):
    """A table row: throughput, the yardstick's overhead, each role's busiest link against the bound."""
    f, b = figures(r), byteps_bound(analysis.Experiment([r]))
    links = (r.data["epochs"][-1].get("link_by_role") or {}) if r.kind == "ps" else {}
    link = r.data["epochs"][-1].get("link") or {}
    worker = max(links.get("worker_sent_bytes_per_step", 0), links.get("worker_received_bytes_per_step", 0)) \
        if links else max(link.get("sent_bytes_per_step", 0), link.get("received_bytes_per_step", 0))
    server = max(links.get("server_sent_bytes_per_step", 0), links.get("server_received_bytes_per_step", 0))
    mb = lambda v: "-" if not v else f"{v / 1e6:.0f}"  # noqa: E731
    cells = [f"{f['throughput']:.1f}", f"{f['throughput'] / base:.2f}x",
             "-" if f["overhead"] is None else f"{1e3 * f['overhead']:.0f}", f"{1e3 * f['step']:.0f}",
             mb(worker), mb(b["worker_bytes"]), f"{worker / b['worker_bytes']:.2f}x",
             mb(server), mb(b["server_bytes"]), f"{server / b['server_bytes']:.2f}x" if server and b["server_bytes"] else "-",
             f"{1e3 * b['seconds']:.0f}", f"{1e3 * b['ring_seconds']:.0f}"]
    return f"| {label} | " + " | ".join(cells) + " |"


def table(results):
    lines = ["| method | img/s | vs DDP | comm overhead (ms) | step (ms) | busiest worker link (MB/step) "
             "| bound (MB) | / bound | busiest server link (MB/step) | bound (MB) | / bound | bound time (ms) "
             "| ring's time (ms) |", "|---|" + "---:|" * 12]
    base = results[0][1].throughput
    return "\n".join(lines + [row(label, r, base) for label, r in results])


def waits(results):
    """The PS workers' waits per step (the epochs' phase_times): for pulls (in forward) and pushes."""
    ms = lambda v: "-" if v is None else f"{1e3 * v:.0f}"  # noqa: E731
    return "; ".join(f"{label}: pull {ms(r.comm_pull)} ms, push {ms(r.comm_push)} ms"
                     for label, r in results if r.kind == "ps")


def means(repeats):
    """Each method's mean throughput over the repeats, its values, and the mean's ratio to DDP's mean."""
    labels = [label for label, _ in repeats[0]]
    values = {label: [dict(rs)[label].throughput for rs in repeats] for label in labels}
    base = statistics.mean(values[labels[0]])
    lines = ["| method | img/s (mean) | each repeat | vs DDP (means) | vs DDP (each repeat) |", "|---|---:|---|---:|---|"]
    for label in labels:
        each = ", ".join(f"{v:.1f}" for v in values[label])
        ratios = ", ".join(f"{v / d:.2f}x" for v, d in zip(values[label], values[labels[0]]))
        lines.append(f"| {label} | {statistics.mean(values[label]):.1f} | {each} | "
                     f"{statistics.mean(values[label]) / base:.2f}x | {ratios} |")
    return "\n".join(lines)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=4, help="worker nodes (1 process each)")
    p.add_argument("--servers-k", type=int, nargs="+", default=[1, 2, 4], help="server node counts")
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--tcp", default=None, help="the nodes' TCP congestion control (emulate_cluster.sh --tcp)")
    p.add_argument("--name", default="servers", help="the emulated cluster's name (one of your own)")
    p.add_argument("--pairs", type=int, default=3, help="the yardstick's --overhead-pairs")
    p.add_argument("--extra", default="", help="more flags for every run")
    p.add_argument("--ps-extra", default="", help="more flags for the PS runs only (e.g. --bucket-mb 1)")
    p.add_argument("--repeats", type=int, default=1, help="run the whole list this many times")
    p.add_argument("--out-dir", default="/tmp/bench_servers")
    p.add_argument("--only", default=None, help="comma-separated labels to run (the others are read from out-dir)")
    p.add_argument("--write", default=None)
    return p.parse_args()


def main():
    args = parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo = experiments(args)
    nodes = args.workers + max(args.servers_k)
    subprocess.run(["bash", EMU, "up", "--name", args.name, "--nodes", str(nodes), "--rate", args.rate,
                    *(["--tcp", args.tcp] if args.tcp else [])], check=True)
    start, repeats = time.time(), []
    try:
        for rep in range(args.repeats):
            results = []
            for i, (label, script, flags, k) in enumerate(todo):
                path = out / (f"results_{i}.json" if rep == 0 else f"results_{i}_r{rep + 1}.json")
                if args.only and label not in args.only.split(","):
                    results.append((label, analysis.load_run(path)))
                    continue
                results.append((label, run(args, label, script, flags, k, path)))
            repeats.append(results)
    finally:
        subprocess.run(["bash", EMU, "down", "--name", args.name])
    ps_extra = f"; PS only: {args.ps_extra}" if args.ps_extra else ""
    runs = "1 run each" if args.repeats == 1 else f"{args.repeats} repeats"
    text = (f"`python bench/bench_servers.py --workers {args.workers} --servers-k {' '.join(map(str, args.servers_k))}"
            f" --rate {args.rate}` ({args.workers} worker nodes x 1 + k server nodes x 1 at {args.rate}; "
            f"{' '.join(SYNTHETIC)} {args.extra}{ps_extra}; yardstick {args.pairs} pairs; {runs}; took "
            f"{time.time() - start:.0f} s)\n")
    for rep, results in enumerate(repeats):
        text += (f"\nRepeat {rep + 1}:\n" if args.repeats > 1 else "\n") + f"\n{table(results)}\n\n{waits(results)}\n"
    if args.repeats > 1:
        text += f"\nMeans over the repeats:\n\n{means(repeats)}\n"
    print(text)
    (out / "table.md").write_text(text)
    if args.write:
        Path(args.write).write_text(text)


if __name__ == "__main__":
    main()
