"""Benchmark: the methods side by side in one invocation, as ratios to DDP, on loopback or an emulated cluster.

    flock /tmp/cpu.lock python bench/bench.py --suite methods --cluster 4x1 --rate 1gbit --repeats 3 --write T.md
    flock /tmp/cpu.lock python bench/bench.py --suite methods                      # loopback, 4 processes

Suites (each a list of experiments; every one runs --repeats times, the repeats interleaved so that a slow drift
of the machine hits every method alike):
  methods      DDP, every all-reduce --sync, every PS --comm, and the sharded PS (--servers all) per --comm
  compression  DDP with no hook, fp16, bf16, PowerSGD; ours with --compress none and fp16
  buckets      DDP and --sync overlap at --buckets MiB
  async        PS sync against PS async (on the sample data: accuracy counts)
  seeds        DDP, all-reduce, PS on the sample data from scratch (the first-run recipe), --repeats seeds
  time         time to SAMPLE_TARGET on the sample recipe (--target-accuracy), --repeats seeds: DDP, the all-reduce,
               the PS (sync, async, sharded), DDP PowerSGD and local SGD (H = LOCAL_STEPS)
  pipelined    DDP, --sync overlap and --sync pipelined (--bucket-mb PIPELINED_MB): also each step against its limit
  hierarchical DDP, --sync overlap and --sync hierarchical: also each node link's bytes against the gradients'
  scaling      DDP, --sync overlap, the single-server PS (collective, and p2p: the star) and the sharded PS on
               --nodes 2 4 8 emulated nodes x 1 (SCALING: MobileNetV3-small, 100mbit links): the cost against N
  ps           DDP, the sharded PS (collective, overlap, pipelined at each --partitions MiB) and the single server
               pipelined: also each against the ideal bytes 2(N-1)/N x state through the busiest link and their time;
               --before REF: every PS run also from git ref REF (the same flags; a --comm it lacks is skipped)
Every number comes from the runs' results JSON, read with the analysis package's own functions: throughput,
the communication overhead (the yardstick: median over its pairs; here also the median and the spread over the
repeats), scaling efficiency, the bytes through the busiest link and the time they take at the link rate.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import analysis  # noqa: E402
from analysis import time_to_target  # noqa: E402
from analysis.links import link_figures  # noqa: E402
from modes import COMM_HOOKS, PARTITION_MB, PS_COMMS as COMMS, SYNC_MODES, sample_args, sample_recipe  # noqa: E402

SYNTHETIC = ["--synthetic", "--arch", "resnet50", "--image-size", "32", "--batch-size", "32", "--epochs", "1",
             "--max-steps", "8", "--warmup-steps", "2", "--workers", "0"]
# The scaling suite's runs: 8 processes share our 2 cores, so a model whose step is short next to its exchange:
# MobileNetV3-small (1.5 M parameters: 6 MB of fp32 gradients) at 32 px, batch 8, on 100 Mbit/s links (see
# bench/RESULTS_scaling.md)
SCALING = ["--synthetic", "--arch", "mobilenet_v3_small", "--image-size", "32", "--batch-size", "8", "--epochs", "1",
           "--max-steps", "6", "--warmup-steps", "2", "--workers", "0"]
SCALING_RATE = "100mbit"
SAMPLE = [*sample_args(), "--workers", "1"]  # run_all.sh's first-run recipe on the sample data (sample_recipe.env)
# The time suite (issue 33): the sample recipe to SAMPLE_TARGET, 3 seeds; --extra "--arch ..." swaps the model
TIME = [*SAMPLE, "--target-accuracy", sample_recipe()["SAMPLE_TARGET"]]
LOCAL_STEPS = 4  # local SGD's H in the time suite
POWERSGD_WARMUP = 8  # PowerSGD compresses after one epoch of plain all-reduce (torch's default 1000 is never reached)
PIPELINED_MB = 4  # --sync pipelined's partitions in its suite: small, so the next forward's first layers come first


def suite(name, args):
    """[(label, script, flags)] of the suite."""
    ddp, ar, ps = "baseline_multi_card.py", "all_reduce_train.py", "ps_train.py"
    if name == "methods":
        return ([("DDP", ddp, [])] + [(f"all-reduce {s}", ar, ["--sync", s]) for s in SYNC_MODES]
                + [(f"PS {c}", ps, ["--comm", c]) for c in COMMS]
                + [(f"PS sharded {c}", ps, ["--servers", "all", "--comm", c]) for c in COMMS])
    if name == "compression":
        return ([("DDP", ddp, [])] + [(f"DDP hook {h}", ddp, ["--comm-hook", h, "--powersgd-warmup", "2"])
                                      for h in COMM_HOOKS[1:]]
                + [("all-reduce overlap", ar, []), ("all-reduce overlap fp16", ar, ["--compress", "fp16"])])
    if name == "buckets":
        return [(f"{label} {mb:g} MiB", script, ["--bucket-mb", str(mb)]) for mb in args.buckets
                for label, script in (("DDP", ddp), ("all-reduce overlap", ar))]
    if name == "async":
        return [("DDP", ddp, []), ("PS sync", ps, []), ("PS async", ps, ["--mode", "async"])]
    if name == "seeds":
        return [("DDP", ddp, []), ("all-reduce overlap", ar, []), ("PS collective", ps, [])]
    if name == "time":
        return [("DDP", ddp, []), ("all-reduce overlap", ar, []), ("PS sync", ps, []),
                ("PS async", ps, ["--mode", "async"]), ("PS sharded", ps, ["--servers", "all"]),
                ("DDP PowerSGD", ddp, ["--comm-hook", "powersgd", "--powersgd-warmup", str(POWERSGD_WARMUP)]),
                (f"local SGD H={LOCAL_STEPS}", ar, ["--sync", "local", "--local-steps", str(LOCAL_STEPS)])]
    if name == "pipelined":
        return [("DDP", ddp, []), ("all-reduce overlap", ar, []),
                ("all-reduce pipelined", ar, ["--sync", "pipelined", "--bucket-mb", str(PIPELINED_MB)])]
    if name == "hierarchical":
        return [("DDP", ddp, []), ("all-reduce overlap", ar, []),
                ("all-reduce hierarchical", ar, ["--sync", "hierarchical"])]
    if name == "ps":
        sharded = ["--servers", "all", "--comm"]
        return ([("DDP", ddp, []), ("PS sharded collective", ps, [*sharded, "collective"]),
                 ("PS sharded overlap", ps, [*sharded, "overlap"])]
                + [(f"PS sharded pipelined{'' if mb == PARTITION_MB else f' {mb:g} MiB'}", ps,
                    [*sharded, "pipelined", "--bucket-mb", f"{mb:g}"]) for mb in args.partitions]
                + [("PS pipelined", ps, ["--comm", "pipelined"])])
    if name == "scaling":  # node count per label, for run() and scaling_table()
        methods = [("DDP", ddp, []), ("all-reduce overlap", ar, ["--sync", "overlap"]),
                   ("PS collective", ps, ["--comm", "collective"]), ("PS p2p", ps, ["--comm", "p2p"]),
                   ("PS sharded collective", ps, ["--servers", "all", "--comm", "collective"])]
        args.nodes_of = {f"{label} N={n}": n for n in args.nodes for label, _, _ in methods}
        return [(f"{label} N={n}", script, flags) for n in args.nodes for label, script, flags in methods]
    raise SystemExit(f"unknown suite {name}")


def before_twin(experiment, ref, out):
    """[the experiment run by git ref `ref`'s ps_train.py (exported once under `out`)], or [] when it is not a PS
    experiment or `ref` has no such --comm."""
    label, script, flags = experiment
    tree = out / f"before-{ref}"
    if script != "ps_train.py":
        return []
    if not tree.exists():
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    help_text = subprocess.run([sys.executable, str(tree / script), "--help"], capture_output=True, text=True).stdout
    comm = flags[flags.index("--comm") + 1] if "--comm" in flags else None
    return [] if comm and comm not in help_text else [(f"{label} @{ref}", str(tree / script), flags)]


def launch(cmd, out):
    """Runs one experiment's command (one thread per process); its results file, read by the analysis."""
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable})
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return analysis.load_run(out)


def run(label, script, flags, args, out, repeat):
    base = SAMPLE if args.suite in ("seeds", "async") else SCALING if args.suite == "scaling" else \
        TIME if args.suite == "time" else SYNTHETIC
    seed = ["--seed", str(repeat)] if args.suite in ("seeds", "time") else []  # repeat: from --first-repeat
    script_args = [str(REPO / script), *base, "--overhead-pairs", str(args.pairs), *seed, *flags,
                   *args.extra.split(), "--output", str(out)]
    if args.cluster:
        nodes, per_node = map(int, args.cluster.split("x"))
        cmd = ["bash", str(REPO / "emulate_cluster.sh"), "torchrun", "--name", args.name, "--nproc-per-node",
               str(per_node), "--logs", str(out.parent / "logs" / out.stem), "--", *script_args]
        if getattr(args, "nodes_of", None):  # the scaling suite: the first N nodes of the cluster
            cmd[3:3] = ["--nodes", str(args.nodes_of[label])]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               *script_args]
    print(f"{time.strftime('%H:%M:%S')} repeat {repeat + 1}: {label}", file=sys.stderr, flush=True)
    return launch(cmd, out)


def figures(run):
    """The numbers a table row needs, from one run."""
    link, y = link_figures(analysis.Experiment([run])), run.yardstick
    staleness = [e.get("staleness_mean") for e in run.epochs if e.get("staleness_mean") is not None]
    return {"throughput": run.throughput, "overhead": y and y.overhead,
            "spread": (y and y.overhead_min, y and y.overhead_max),
            "efficiency": run.scaling_efficiency, "hidden": y and y.hidden_share,
            "link_mb": None if link is None else link.busiest / 1e6,
            "bound": None if link is None else link.link_time,
            "predicted_mb": None if link is None or link.bound_bytes is None else link.bound_bytes / 1e6,
            "rate_bits": None if link is None else link.rate_bits,
            "accuracy": None if run.synthetic else run.final_val_accuracy,
            "loss": run.final_train_loss, "staleness": statistics.mean(staleness) if staleness else None,
            "pull": run.comm_pull, "push": run.comm_push, "step": run.batch_time, "local": y and y.local_step_time,
            "gradient_mb": run.gradient_bytes and run.gradient_bytes / 1e6}


def med(runs, key):
    """The median of a figure over the repeats that have it (None: none has)."""
    values = [f[key] for f in runs if f[key] is not None]
    return statistics.median(values) if values else None


def table(rows):
    """Markdown: medians over the repeats; throughput as a ratio to the first row (DDP); the overhead with its
    range over the repeats and the yardstick's own spread (min-max over its pairs)."""
    def cell(value, fmt):
        return "-" if value is None else fmt.format(value)

    base = med(next(iter(rows.values())), "throughput")
    lines = ["| method | img/s | vs DDP | comm overhead (ms) | over repeats (ms) | repeat spread | pairs' spread (ms) "
             "| efficiency | hidden | busiest link (MB/step) | link time (ms) | overhead / link time | val acc (%) "
             "| staleness |", "|---|" + "---:|" * 13]
    for label, runs in rows.items():
        thr, ov, bound = med(runs, "throughput"), med(runs, "overhead"), med(runs, "bound")
        ovs = [f["overhead"] for f in runs if f["overhead"] is not None]
        lo, hi = (statistics.median(f["spread"][i] for f in runs if f["spread"][i] is not None) if ov is not None
                  else None for i in (0, 1))
        acc = [f["accuracy"] for f in runs if f["accuracy"] is not None]
        lines.append(" | ".join([
            f"| {label}", cell(thr, "{:.1f}"), f"{thr / base:.2f}x", cell(ov and 1e3 * ov, "{:.0f}"),
            f"{1e3 * min(ovs):.0f} to {1e3 * max(ovs):.0f}" if len(ovs) > 1 else "-",
            f"{100 * (max(ovs) - min(ovs)) / ov:.0f}%" if len(ovs) > 1 and ov else "-",
            f"{1e3 * lo:.0f} to {1e3 * hi:.0f}" if ov is not None else "-",
            cell(med(runs, "efficiency") and 100 * med(runs, "efficiency"), "{:.0f}%"),
            cell(med(runs, "hidden") and 100 * med(runs, "hidden"), "{:.0f}%"), cell(med(runs, "link_mb"), "{:.0f}"),
            cell(bound and 1e3 * bound, "{:.0f}"), f"{ov / bound:.2f}x" if bound and ov is not None else "-",
            (f"{statistics.mean(acc):.1f} ± {statistics.stdev(acc):.1f}" if len(acc) > 1 else cell(
                acc[0] if acc else None, "{:.1f}")), cell(med(runs, "staleness"), "{:.2f}")]) + " |")
    return "\n".join(lines)


def time_table(experiments, args, out):
    """Markdown: each experiment's time to the target (training seconds, validation excluded; mean ± sd over the
    seeds), steps and epochs, fastest first, each against the fastest judged against the seeds' spread
    (analysis/time_to_target.py)."""
    found = [(label, sorted(out.glob(f"results_{i}_*.json"))) for i, (label, _, _) in enumerate(suite("time", args))]
    # every experiment and repeat in --out-dir, earlier invocations' (--only, --first-repeat) too
    xs = [(label, analysis.Experiment([analysis.load_run(p) for p in paths])) for label, paths in found if paths]
    labels = {id(x): label for label, x in xs}
    xs = [x for _, x in xs]
    target = time_to_target.choose_targets(xs)[0]
    done, missed = time_to_target.ranking(xs, target)
    lines = [f"Time to {target:g}% validation accuracy ({time_to_target.headline_words(xs, target)}), fastest first:",
             "", "| method | seconds to target | steps | epochs | vs the fastest | verdict |",
             "|---|---:|---:|---:|---:|---|"]
    for g in done:
        verdict = "-" if g is done[0] else time_to_target.compare_reach(g, done[0]).words
        lines.append(f"| {labels[id(g.x)]} | {g.text()} | {g.steps.text(0) if g.steps else '-'} | "
                     f"{g.epochs.text(1)} | {g.seconds.mean / done[0].seconds.mean:.2f}x | {verdict} |")
    lines += [f"| {labels[id(g.x)]} | {g.text()} | - | - | - | did not reach it |" for g in missed]
    return "\n".join(lines)


def ideal_table(rows):
    """Markdown: each row against the ideal bytes through the busiest link, 2(N-1)/N x what it exchanges (the
    state for the sharded PS: push to the owners and pull back, the all-reduce's bound; the gradients for DDP), and
    the time they take at the link rate: the busiest link's bytes / ideal and the overhead / that time. Medians
    over the repeats."""
    base = med(next(iter(rows.values())), "throughput")
    lines = ["| method | img/s | vs DDP | comm overhead (ms) | hidden | busiest link (MB/step) | ideal (MB/step) "
             "| busiest / ideal | ideal at link rate (ms) | overhead / ideal time |", "|---|" + "---:|" * 9]
    for label, runs in rows.items():
        thr, ov, hidden, link, ideal = (med(runs, k) for k in ("throughput", "overhead", "hidden", "link_mb",
                                                                "predicted_mb"))
        rate = med(runs, "rate_bits")
        ideal_s = ideal * 1e6 * 8 / rate if ideal and rate else None
        cells = [f"{thr:.1f}", f"{thr / base:.2f}x", "-" if ov is None else f"{1e3 * ov:.0f}",
                 "-" if hidden is None else f"{100 * hidden:.0f}%", "-" if link is None else f"{link:.0f}",
                 "-" if ideal is None else f"{ideal:.0f}", "-" if not (link and ideal) else f"{link / ideal:.2f}x",
                 "-" if ideal_s is None else f"{1e3 * ideal_s:.0f}",
                 "-" if not (ideal_s and ov is not None) else f"{ov / ideal_s:.2f}x"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def limit_table(rows):
    """Markdown: each step against its physical limit, max(the step without communication, its busiest link's
    measured bytes at the link rate), and the busiest link's bytes against one copy of the gradients; medians over
    the repeats."""
    base = med(next(iter(rows.values())), "throughput")
    lines = ["| method | img/s | vs DDP | step (ms) | no-comm step (ms) | link time (ms) | limit (ms) | limit / step "
             "| busiest link (MB/step) | / gradients |", "|---|" + "---:|" * 9]
    for label, runs in rows.items():
        thr, step, local, bound = (med(runs, k) for k in ("throughput", "step", "local", "bound"))
        limit = max(local, bound or 0) if local is not None else None
        link, grads = med(runs, "link_mb"), med(runs, "gradient_mb")
        cells = [f"{thr:.1f}", f"{thr / base:.2f}x", f"{1e3 * step:.0f}",
                 "-" if local is None else f"{1e3 * local:.0f}", "-" if bound is None else f"{1e3 * bound:.0f}",
                 "-" if limit is None else f"{1e3 * limit:.0f}", "-" if limit is None else f"{limit / step:.2f}",
                 "-" if link is None else f"{link:.0f}", "-" if link is None or not grads else f"{link / grads:.2f}x"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scaling_table(experiments, args, out):
    """Markdown: per method and node count, the communication (the yardstick's overhead) against the time its own
    pattern's bytes take at the link rate, medians over the repeats. The patterns, per direction through the
    busiest node link: the ring (DDP, --sync overlap) 2(N-1)/N x gradients; the sharded PS 2(N-1)/N x state, both
    directions at once; the single server a star, (N-1) x state in (push) and then (N-1) x state out (pull), one
    after the other, so twice their time (with --comm collective, gloo's reduce and broadcast need not be a star:
    the measured bytes say what they moved)."""
    rate = None
    lines = ["| method | N | img/s | comm overhead (ms) | busiest link sent / received (MB/step) "
             "| pattern (MB each way) | busiest / pattern | pattern at link rate (ms) | overhead / pattern time "
             "| measured bytes at link rate (ms) |", "|---|" + "---:|" * 9]
    for i, (label, _, _) in enumerate(experiments):
        n, cells = args.nodes_of[label], {}
        for repeat in range(args.first_repeat, args.first_repeat + args.repeats):
            r = analysis.load_run(out / f"results_{i}_{repeat}.json")
            x, rate = analysis.Experiment([r]), r.network["link_rate_bits"]
            f, y = link_figures(x), r.yardstick
            if x.kind == "ps" and x.single_server:
                pattern, directions = (n - 1) * x.state_bytes, 2
            elif x.kind == "ps":
                pattern, directions = 2 * (n - 1) / n * x.state_bytes, 1
            else:
                pattern, directions = 2 * (n - 1) / n * x.wire_bytes, 1
            for key, value in (("thr", r.throughput), ("ov", y and y.overhead), ("busiest", f.busiest),
                               ("sent", f.sent), ("received", f.received),
                               ("pattern", pattern), ("time", directions * pattern * 8 / rate),
                               ("measured", f.link_time)):
                cells.setdefault(key, []).append(value)
        m = {k: statistics.median(v) for k, v in cells.items() if None not in v}
        lines.append(f"| {label.rsplit(' N=', 1)[0]} | {n} | {m['thr']:.1f} | {1e3 * m['ov']:.0f} | "
                     f"{m['sent'] / 1e6:.1f} / {m['received'] / 1e6:.1f} | {m['pattern'] / 1e6:.1f} | "
                     f"{m['busiest'] / m['pattern']:.2f}x | "
                     f"{1e3 * m['time']:.0f} | {m['ov'] / m['time']:.2f}x | {1e3 * m['measured']:.0f} |")
    return "\n".join(lines)


def parse_args():
    """The command line; --suite scaling brings its own cluster and rate."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--suite", default="methods", choices=("methods", "compression", "buckets", "async", "seeds",
                                                          "pipelined", "hierarchical",
                                                          "scaling", "ps", "time"))
    p.add_argument("--cluster", default=None, help="NODESxPROCS on an emulated cluster (needs root), e.g. 4x1")
    p.add_argument("--name", default="bench", help="the emulated cluster's name (one per concurrent benchmark)")
    p.add_argument("--rate", default="1gbit", help="the emulated links' rate")
    p.add_argument("--nproc", type=int, default=4, help="processes on loopback")
    p.add_argument("--repeats", type=int, default=1, help="runs of each experiment, interleaved (seeds: seeds)")
    p.add_argument("--first-repeat", type=int, default=0,
                   help="the first repeat's number (seeds, time: its seed), to add repeats to an --out-dir later")
    p.add_argument("--pairs", type=int, default=3, help="the yardstick's --overhead-pairs")
    p.add_argument("--buckets", type=float, nargs="+", default=[1, 5, 25, 100], help="bucket sizes (MiB)")
    p.add_argument("--nodes", type=int, nargs="+", default=[2, 4, 8], help="scaling: node counts (1 process each)")
    p.add_argument("--partitions", type=float, nargs="+", default=[PARTITION_MB],
                   help="ps: the sharded pipelined PS's partition sizes (MiB)")
    p.add_argument("--before", default=None, help="ps, methods: also run every PS experiment from this git ref")
    p.add_argument("--only", default=None, help="comma-separated labels to keep from the suite")
    p.add_argument("--extra", default="", help="more flags for every run")
    p.add_argument("--out-dir", default="/tmp/bench", help="where the runs' results JSON go")
    p.add_argument("--write", default=None, help="also write the table (markdown) to this file")
    args = p.parse_args()
    if args.suite == "scaling":  # one cluster of the most nodes; each run takes its first N
        args.cluster = args.cluster or f"{max(args.nodes)}x1"
        args.rate = args.rate if "--rate" in sys.argv else SCALING_RATE
    return args


def main():
    args = parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    experiments = suite(args.suite, args)
    numbers = {label: i for i, (label, _, _) in enumerate(experiments)}
    if args.only:
        experiments = [e for e in experiments if e[0] in args.only.split(",")]
    if args.before:  # each PS experiment twice, the ref's script beside this tree's
        experiments = [twin for e in experiments for twin in [e, *before_twin(e, args.before, out)]]
    where = f"emulated cluster {args.cluster} at {args.rate}" if args.cluster else f"loopback, {args.nproc} processes"
    if args.cluster:
        nodes = args.cluster.split("x")[0]
        subprocess.run(["bash", str(REPO / "emulate_cluster.sh"), "up", "--name", args.name, "--nodes", nodes,
                        "--rate", args.rate], check=True)
    start, rows = time.time(), {label: [] for label, _, _ in experiments}
    try:
        for repeat in range(args.first_repeat, args.first_repeat + args.repeats):
            for i, (label, script, flags) in enumerate(experiments):
                i = numbers.get(label, i) if args.suite == "time" else i  # the suite's numbering, whatever --only
                rows[label].append(figures(run(label, script, flags, args, out / f"results_{i}_{repeat}.json", repeat)))
    finally:
        if args.cluster:
            subprocess.run(["bash", str(REPO / "emulate_cluster.sh"), "down", "--name", args.name])
    base = TIME if args.suite == "time" else SAMPLE if args.suite in ("seeds", "async") else SCALING \
        if args.suite == "scaling" else SYNTHETIC
    header = (f"`python bench/bench.py --suite {args.suite}{f' --cluster {args.cluster} --rate {args.rate}' if args.cluster else ''}"
              f" --repeats {args.repeats}{f' --extra {args.extra!r}' if args.extra else ''}` ({where}; {' '.join(base)}"
              f" {args.extra}; yardstick {args.pairs} pairs; medians over {args.repeats} repeat(s); took "
              f"{time.time() - start:.0f} s)")
    text = f"{header}\n\n{table(rows)}\n"
    if args.suite == "scaling":  # a table per node count (ratios to DDP at that N), then the cost against N
        text = f"{header}\n\n" + "\n".join(
            f"N = {n}:\n\n{table({k: v for k, v in rows.items() if args.nodes_of[k] == n})}\n" for n in args.nodes)
        text += f"\nThe cost against N:\n\n{scaling_table(experiments, args, out)}\n"
    if args.suite in ("pipelined", "hierarchical"):
        text += f"\n{limit_table(rows)}\n"
    if args.suite == "ps":
        text += f"\n{ideal_table(rows)}\n\n{limit_table(rows)}\n"
    if args.suite == "time":
        text += f"\n{time_table(experiments, args, out)}\n"
    print(text)
    (out / "figures.json").write_text(json.dumps(rows, indent=1))
    if args.write:
        Path(args.write).write_text(text)


if __name__ == "__main__":
    main()
