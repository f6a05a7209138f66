"""Compares the methods' results: terminal tables, plots and a written report, every claim from a number.

    python analyze_results.py [--results-dir ./] [--out-dir ./]

Reads every results_*.json in --results-dir (fields: docs/results_schema.md) and writes
<out-dir>/plots/*.png, performance_report.txt and report_tables.md. A run's method and variant come from the
file's content, never its name. Runs that differ only in their seed are one experiment: its numbers are the
mean over seeds (with the spread), and the seed-to-seed spread is the noise floor the report judges
differences against. A file that cannot be read is named in one line and skipped; a run that did not finish
is kept but marked "(incomplete)" everywhere.
"""
import argparse
import collections
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from all_reduce_train import SYNC_MODES  # noqa: E402
from baseline_multi_card import COMM_HOOKS  # noqa: E402
from ps_train import COMMS  # noqa: E402

# kind: display name, colour map, order of its variants (the script's default first)
KINDS = {"baseline_ddp": ("Baseline DDP", "Blues", COMM_HOOKS),
         "all_reduce": ("Manual All-Reduce", "Oranges", SYNC_MODES),
         "ps": ("Parameter Server", "Greens", COMMS)}
EPOCH_KEYS = ("epoch", "train_loss", "train_accuracy", "train_time", "train_throughput", "avg_batch_time")
PHASE_COLOURS = {"data loading": "#bbbbbb", "compute (no-communication step)": "#555555",
                 "communication overhead": "#d62728", "other": "#9467bd"}


# --------------------------------------------------------------------------- loading
@dataclasses.dataclass
class Run:
    """One results file."""
    data: dict
    path: Path
    kind: str
    variant: str

    @property
    def complete(self):
        return self.data.get("status") == "complete"

    @property
    def epochs(self):
        return self.data["epochs"]

    def metric(self, key):
        """A summary figure as the file states it, else the mean over its epochs, else None."""
        value = self.data.get("summary", {}).get(key)
        if isinstance(value, (int, float)):
            return float(value)
        key = {"avg_train_throughput": "train_throughput", "avg_train_time_per_epoch": "train_time"}.get(key, key)
        values = [e[key] for e in self.epochs if isinstance(e.get(key), (int, float))]
        return statistics.mean(values) if values and len(values) == len(self.epochs) else None

    def overhead(self, key="overhead"):
        value = (self.data.get("comm_overhead") or {}).get(key)
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def synthetic(self):
        return bool(self.data.get("args", {}).get("synthetic"))

    def best_accuracy(self):
        return None if self.synthetic else self.metric("best_val_accuracy")

    def final_accuracy(self):
        return None if self.synthetic else self.metric("final_val_accuracy")

    def link(self):
        """(sent, received) bytes per step through the busiest node link, mean over epochs, or None."""
        links = [e.get("link") for e in self.epochs]
        if not links or not all(isinstance(x, dict) for x in links):
            return None
        return tuple(statistics.mean(x[f"{d}_bytes_per_step"] for x in links) for d in ("sent", "received"))


def variant_of(kind, data):
    """The variant as the file states it: the settings that make it another experiment than the default."""
    if kind == "baseline_ddp":
        parts = [data.get("comm_hook", "none")]
    elif kind == "all_reduce":
        parts = [data.get("sync", SYNC_MODES[0])] + ([f"{data['compress']}"] if data.get("compress", "none") != "none"
                                                     else [])
    else:
        parts = [data.get("comm", COMMS[0])] + (["async"] if data.get("mode", "sync") != "sync" else []) + \
            (["sharded"] if data.get("servers", "1") != "1" else [])
    if data.get("bucket_mb", 25.0) != 25.0 and kind != "ps":
        parts.append(f"{data['bucket_mb']:g} MiB buckets")
    return ", ".join(parts)


def load_run(path):
    """One results file as a Run; raises ValueError saying what is wrong with it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if data.get("kind") not in KINDS:
        raise ValueError(f"unknown method kind {data.get('kind')!r} (expected one of {', '.join(KINDS)})")
    for key in ("world_size", "batch_size"):
        if not isinstance(data.get(key), int) or data[key] < 1:
            raise ValueError(f"missing or invalid {key!r}")
    if not isinstance(data.get("epochs"), list) or not data["epochs"]:
        raise ValueError("no finished epoch")
    for i, e in enumerate(data["epochs"]):
        bad = [k for k in EPOCH_KEYS if not isinstance(e, dict) or not isinstance(e.get(k), (int, float))
               or not math.isfinite(e[k])]
        if bad:
            raise ValueError(f"epoch {i + 1} lacks valid {', '.join(bad)}")
    return Run(data, path, data["kind"], variant_of(data["kind"], data))


@dataclasses.dataclass
class Experiment:
    """The runs of one method and variant at one world size and batch, one per seed."""
    runs: list
    label: str = ""
    colour: tuple = (0, 0, 0)

    @property
    def first(self):
        return self.runs[0]

    kind = property(lambda self: self.first.kind)
    variant = property(lambda self: self.first.variant)
    world_size = property(lambda self: self.first.data["world_size"])
    batch_size = property(lambda self: self.first.data["batch_size"])
    complete = property(lambda self: all(r.complete for r in self.runs))
    seeds = property(lambda self: [r.data.get("seed", r.data.get("args", {}).get("seed")) for r in self.runs])

    @property
    def trainers(self):
        """Processes that compute gradients: all, except a single parameter server."""
        default = self.world_size - 1 if self.kind == "ps" and self.first.data.get("servers", "1") == "1" \
            else self.world_size
        return self.first.data.get("trainers", default)

    def values(self, get):
        return [v for v in (get(r) for r in self.runs) if v is not None]

    def mean(self, get):
        values = self.values(get)
        return statistics.mean(values) if values else None

    def spread(self, get):
        """Standard deviation over seeds (None with fewer than two)."""
        values = self.values(get)
        return statistics.stdev(values) if len(values) > 1 else None


def load_all(results_dir):
    """Every readable results_*.json in the folder, grouped into labelled experiments; prints one line per
    skipped file."""
    runs, skipped = [], []
    for path in sorted(Path(results_dir).glob("results_*.json")):
        try:
            runs.append(load_run(path))
        except ValueError as e:
            skipped.append(f"{path.name}: {e}")
            print(f"skipped {path.name}: {e}", file=sys.stderr)
    groups = collections.defaultdict(list)
    for run in runs:
        key = (run.kind, run.variant, run.data["world_size"], run.data["batch_size"])
        seed = run.data.get("seed")
        # Two files of the same seed are two experiments (told apart by file name), not two seeds.
        slot = next((i for i, g in enumerate(groups[key]) if seed not in [r.data.get("seed") for r in g]), None)
        if slot is None:
            groups[key].append([run])
        else:
            groups[key][slot].append(run)
    experiments = [Experiment(sorted(g, key=lambda r: str(r.data.get("seed")))) for gs in groups.values() for g in gs]

    def order(x):
        variants = [v for v in KINDS[x.kind][2]]
        base = x.variant.split(", ")[0]
        return (list(KINDS).index(x.kind), variants.index(base) if base in variants else len(variants), x.variant,
                x.world_size, x.first.path.name)
    experiments.sort(key=order)
    several_sizes = len({x.world_size for x in experiments}) > 1
    for x in experiments:
        shown = ", ".join(part for part in x.variant.split(", ") if part != "none")  # DDP without a hook
        x.label = KINDS[x.kind][0] + (f" ({shown})" if shown else "")
        x.label += f" [{x.world_size} proc]" if several_sizes else ""
    counts = collections.Counter(x.label for x in experiments)
    for x in experiments:
        x.label += f" <{x.first.path.name}>" if counts[x.label] > 1 else ""
        x.label += f" ({len(x.runs)} seeds)" if len(x.runs) > 1 else ""
        x.label += "" if x.complete else " (incomplete)"
    for kind, (_, cmap, _) in KINDS.items():  # one colour per variant, shades of one hue per method
        variants = list(dict.fromkeys(x.variant for x in experiments if x.kind == kind))
        for x in experiments:
            if x.kind == kind:
                x.colour = plt.get_cmap(cmap)(0.85 - 0.35 * variants.index(x.variant) / max(1, len(variants) - 1))
    return experiments, skipped


# --------------------------------------------------------------------------- derived numbers
THROUGHPUT = lambda r: r.metric("avg_train_throughput")  # noqa: E731


def baseline_for(x, experiments):
    """The DDP experiment (default hook and buckets) of the same world size that speedups are relative to."""
    ddps = [d for d in experiments if d.kind == "baseline_ddp" and d.world_size == x.world_size and
            d.variant == KINDS["baseline_ddp"][2][0]]
    return sorted(ddps, key=lambda d: not d.complete)[0] if ddps else None


def twin_ddp(x, experiments):
    """The DDP doing this experiment's math: as many trainers, the same batch (a PS with N workers = DDP on N)."""
    twins = [d for d in experiments if d.kind == "baseline_ddp" and d.world_size == x.trainers
             and d.batch_size == x.batch_size and d.variant == KINDS["baseline_ddp"][2][0]]
    return twins[0] if twins else None


def loss_curve(run):
    """(epoch position, per-step loss) of one run; x in epochs so runs with other step counts line up."""
    xs, ys = [], []
    for e in run.epochs:
        losses = e.get("all_losses") or []
        xs += [e["epoch"] - 1 + (i + 1) / len(losses) for i in range(len(losses))]
        ys += losses
    return np.array(xs), np.array(ys, dtype=float)


def smooth(y, window):
    """Centred moving average that keeps the length (narrower windows at the ends)."""
    if window <= 1 or len(y) < 3:
        return y
    c = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(len(y))
    lo, hi = np.clip(i - window // 2, 0, len(y)), np.clip(i + window - window // 2, 0, len(y))
    return (c[hi] - c[lo]) / (hi - lo)


def smoothed(run):
    x, y = loss_curve(run)
    steps_per_epoch = len(y) / max(1, len(run.epochs))
    return x, smooth(y, max(1, round(steps_per_epoch / 4)))


def curves_on(grid, x):
    """Each seed's smoothed loss curve of experiment `x` on `grid`."""
    return np.array([np.interp(grid, *smoothed(r)) for r in x.runs])


def common_grid(*experiments):
    ends = [smoothed(r)[0] for x in experiments for r in x.runs]
    if any(len(e) < 2 for e in ends):
        return None
    lo, hi = max(e[0] for e in ends), min(e[-1] for e in ends)
    return np.linspace(lo, hi, 200) if hi > lo else None


def seed_floor(x, grid):
    """The noise floor: mean |difference| between two seeds' smoothed loss curves (None with one seed)."""
    if len(x.runs) < 2:
        return None
    c = curves_on(grid, x)
    return float(np.mean([np.mean(np.abs(c[i] - c[j])) for i in range(len(c)) for j in range(i + 1, len(c))]))


def link_bound(x):
    """(measured (sent, received) bytes per step on the busiest link, the seconds those take at the link rate,
    the bytes the method's pattern predicts per direction or None, and how that was derived) or None.
    An all-reduce, and a sharded PS (every node serves and is served in both phases), send and receive at once:
    the bound is the larger direction. A single server pulls (sends), then gathers pushes (receives): the two
    directions one after the other, the bound is their sum."""
    net = x.first.data.get("network") or {}
    link = x.first.link()
    if not link or not net.get("link_rate_bits"):
        return None
    d = x.first.data
    single_server = x.kind == "ps" and d.get("servers", "1") == "1"
    seconds = (sum(link) if single_server else max(link)) * 8 / net["link_rate_bits"]
    n, per_node = x.world_size, net.get("procs_per_node", 1)
    if x.kind in ("baseline_ddp", "all_reduce") and d.get("wire_bytes_per_step"):
        return link, seconds, 2 * (n - 1) / n * d["wire_bytes_per_step"], "ring: 2(N-1)/N x gradients"
    if x.kind == "ps" and not single_server and d.get("state_bytes"):  # pull + push, (N-1)/N of the state each
        return link, seconds, 2 * (n - 1) / n * d["state_bytes"], "sharded: 2(N-1)/N x state each way"
    if x.kind == "ps" and x.variant.startswith("p2p") and d.get("state_bytes"):
        remote = n - per_node  # workers not on the server's node: their traffic crosses its link
        return link, seconds, remote * d["state_bytes"], "star: (workers off the server's node) x state"
    return link, seconds, None, "measured only (the backend's own algorithm)"


# --------------------------------------------------------------------------- tables
def fmt(value, digits=2, scale=1.0):
    return "-" if value is None else f"{value * scale:.{digits}f}"


def fmt_mean(x, get, digits=2, scale=1.0):
    """The mean over seeds, with ± the standard deviation when there are several."""
    mean, sd = x.mean(get), x.spread(get)
    return fmt(mean, digits, scale) + ("" if sd is None else f" ± {sd * scale:.{digits}f}")


def performance_table(experiments):
    headers = ["Method", "Avg throughput (img/s)", "Avg train time/epoch (s)", "Best accuracy (%)",
               "Relative speedup", "Trainers x batch", "Seeds"]
    rows = []
    for x in experiments:
        base, twin = baseline_for(x, experiments), twin_ddp(x, experiments)
        if base is x:
            speed = "1.00x (baseline)"
        elif base is not None:
            speed = f"{x.mean(THROUGHPUT) / base.mean(THROUGHPUT):.2f}x"
        elif twin is not None:  # e.g. a PS on N+1 processes against DDP on its N trainers
            speed = f"{x.mean(THROUGHPUT) / twin.mean(THROUGHPUT):.2f}x (vs DDP on {twin.world_size})"
        else:
            speed = "n/a (no DDP run)"
        accuracy = "n/a (synthetic)" if x.first.synthetic else fmt_mean(x, Run.best_accuracy)
        trainers = f"{x.trainers} x {x.batch_size}" + (" (+1 server)" if x.trainers < x.world_size else "")
        rows.append([x.label, fmt_mean(x, THROUGHPUT, 1), fmt_mean(x, lambda r: r.metric("avg_train_time_per_epoch")),
                     accuracy, speed, trainers, ", ".join(map(str, x.seeds))])
    return headers, rows


def comm_table(experiments):
    headers = ["Method", "Comm overhead (ms/step)", "Spread min-max (ms)", "Share of step (%)",
               "Scaling efficiency (%)", "Param pull (ms)", "Grad push (ms)", "All-Reduce wait (ms)",
               "Server update (ms)", "Hidden behind backward (%)"]
    rows = []
    for x in experiments:
        ms = lambda key: fmt_mean(x, lambda r: r.overhead(key), 1, 1e3)  # noqa: E731
        lo, hi = x.mean(lambda r: r.overhead("overhead_min")), x.mean(lambda r: r.overhead("overhead_max"))
        wait = fmt_mean(x, lambda r: r.metric("avg_comm_time"), 1, 1e3) if x.kind == "all_reduce" else "-"
        rows.append([x.label, ms("overhead"), "-" if lo is None else f"{1e3 * lo:.1f} to {1e3 * hi:.1f}",
                     fmt_mean(x, lambda r: r.overhead("overhead_share"), 1, 100),
                     fmt_mean(x, lambda r: r.metric("scaling_efficiency"), 1, 100),
                     fmt_mean(x, lambda r: r.metric("avg_comm_time_pull"), 1, 1e3),
                     fmt_mean(x, lambda r: r.metric("avg_comm_time_push"), 1, 1e3), wait,
                     fmt_mean(x, lambda r: r.metric("avg_server_update_time"), 1, 1e3),
                     fmt_mean(x, lambda r: r.overhead("hidden_share"), 0, 100)])
    return headers, rows


def link_table(experiments):
    headers = ["Method", "Link", "Busiest link sent / received per step (MB)", "Time at link rate (ms)",
               "Pattern predicts (MB per direction)", "Comm overhead / link time"]
    rows = []
    for x in experiments:
        bound = link_bound(x)
        if bound is None:
            continue
        (sent, received), seconds, predicted, how = bound
        overhead = x.mean(lambda r: r.overhead())
        rows.append([x.label, x.first.data["network"].get("link_rate") or "?",
                     f"{sent / 1e6:.1f} / {received / 1e6:.1f}", f"{1e3 * seconds:.1f}",
                     f"{predicted / 1e6:.1f} ({how})" if predicted else how,
                     "-" if overhead is None else f"{overhead / seconds:.2f}x"])
    return headers, rows


def tradeoff_table(experiments):
    """Speed beside accuracy for the variants that trade one for the other (compression, async PS)."""
    headers = ["Method", "Bytes on the wire per step (MB)", "Avg throughput (img/s)", "Final train loss",
               "Final val accuracy (%)", "Staleness mean / max (updates)"]
    rows = []
    for x in experiments:
        d = x.first.data
        stale = "-" if d.get("mode") != "async" else \
            f"{x.mean(lambda r: r.metric('staleness_mean')):.2f} / {x.mean(lambda r: r.metric('staleness_max')):.0f}"
        rows.append([x.label, fmt(d.get("wire_bytes_per_step"), 1, 1e-6), fmt_mean(x, THROUGHPUT, 1),
                     fmt_mean(x, lambda r: r.metric("final_train_loss"), 4),
                     "n/a (synthetic)" if x.first.synthetic else fmt_mean(x, Run.final_accuracy), stale])
    return headers, rows


def has_tradeoffs(experiments):
    return any(x.first.data.get("compress", "none") != "none" or x.first.data.get("comm_hook", "none") != "none"
               or x.first.data.get("mode") == "async" for x in experiments)


def render_text(headers, rows):
    widths = [max(len(c) for c in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def render_markdown(headers, rows):
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * len(headers)) + "|",
                      *("| " + " | ".join(r) + " |" for r in rows)])


COMM_NOTE = ("Comm overhead: the method's training step minus the same step with no communication at all, "
             "measured the same way for every method in pairs before epoch 1 (median; min-max over the pairs "
             "beside it); share = overhead / step; scaling efficiency = throughput / (trainers x the "
             "no-communication throughput of one). The other columns are each method's own waits: the PS's "
             "pull and push (means over workers), the all-reduce's wait after backward, the server's update; "
             "hidden = 1 - overhead / the same buckets synchronized blocking after backward, both measured in "
             "the run.")


# --------------------------------------------------------------------------- plots
def bar_axes(experiments, extra_height=1.2):
    fig, ax = plt.subplots(figsize=(10, extra_height + 0.55 * len(experiments)))
    y = np.arange(len(experiments))[::-1]
    ax.set_yticks(y, [x.label for x in experiments])
    for tick, x in zip(ax.get_yticklabels(), experiments):
        tick.set_color(x.colour)
    return fig, ax, y


def save(fig, ax, path, xlabel, ylabel, title, legend=None):
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.set_title(title, pad=24 if legend and legend.get("loc") == "lower center" else 6)
    ax.grid(axis="x" if ylabel is None else "both", alpha=0.3)
    if legend:
        ax.legend(**legend)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def bars(experiments, get, path, xlabel, title, text, scale=1.0):
    """A horizontal bar per experiment (mean over seeds, whiskers ± sd); incomplete ones hatched."""
    fig, ax, y = bar_axes(experiments)
    means = [(x.mean(get) or 0.0) * scale for x in experiments]
    for yi, x, m in zip(y, experiments, means):
        sd = x.spread(get)
        ax.barh(yi, m, color=x.colour, edgecolor="black", linewidth=0.6, hatch=None if x.complete else "//",
                xerr=None if sd is None else sd * scale, capsize=4)
        ax.text(m + max(means + [1e-9]) * 0.01, yi, " " + text(m, x), va="center", fontsize=9)
    ax.set_xlim(0, max(means + [1e-9]) * 1.45)
    save(fig, ax, path, xlabel, None, title)


NESTED_LEGEND = dict(fontsize=8, title="curves that coincide nest (wider drawn first)", title_fontsize=8,
                     loc="upper left", bbox_to_anchor=(1.01, 1))


def widths(n):
    return np.linspace(5, 1.5, n) if n > 1 else [2]


def plot_loss(experiments, path):
    fig, ax = plt.subplots(figsize=(11, 5.5))
    for x, width in zip(experiments, widths(len(experiments))):
        grid = common_grid(x)
        style = dict(color=x.colour, linestyle="-" if x.complete else "--")
        if grid is None or len(x.runs) == 1:
            ax.plot(*loss_curve(x.first), color=x.colour, alpha=0.2, linewidth=0.8)
            ax.plot(*smoothed(x.first), linewidth=width, label=x.label, **style)
            continue
        c = curves_on(grid, x)
        ax.fill_between(grid, c.min(0), c.max(0), color=x.colour, alpha=0.2)
        ax.plot(grid, c.mean(0), linewidth=width, label=x.label, **style)
    save(fig, ax, path, "epoch", "training loss (cross-entropy)",
         "Training loss per step (moving average over ~1/4 epoch; band: min-max over seeds; faint: raw)",
         NESTED_LEGEND)


def plot_accuracy(experiments, path):
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, key, title in zip(axes, ("train_accuracy", "val_accuracy"), ("Training accuracy", "Validation accuracy")):
        for i, (x, width) in enumerate(zip(experiments, widths(len(experiments)))):
            epochs = sorted({e["epoch"] for r in x.runs for e in r.epochs if isinstance(e.get(key), (int, float))})
            means = [statistics.mean(e[key] for r in x.runs for e in r.epochs if e["epoch"] == n
                                     and isinstance(e.get(key), (int, float))) for n in epochs]
            if epochs:
                ax.plot(epochs, means, marker="osD^vPX"[i % 7], markersize=2.5 * width + 2, linewidth=width,
                        color=x.colour, label=x.label, linestyle="-" if x.complete else "--")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%, mean over seeds)")
    save(fig, axes[1], path, "epoch", None, "Validation accuracy", NESTED_LEGEND)


def plot_comm(experiments, path):
    """The yardstick for every method (whiskers: min-max over the pairs) and the link-rate bound."""
    fig, ax, y = bar_axes(experiments, 1.6)
    ends = []
    for yi, x in zip(y, experiments):
        overhead = x.mean(lambda r: r.overhead())
        lo, hi = x.mean(lambda r: r.overhead("overhead_min")), x.mean(lambda r: r.overhead("overhead_max"))
        bound = link_bound(x)
        style = dict(color=x.colour, edgecolor="black", linewidth=0.6, hatch=None if x.complete else "//")
        if overhead is None:
            ax.text(0, yi, " not measured (--overhead-pairs 0)", va="center", fontsize=9)
            ends.append(0)
            continue
        ax.barh(yi, 1e3 * overhead, xerr=[[1e3 * (overhead - lo)], [1e3 * (hi - overhead)]], capsize=4, **style)
        text = f"{1e3 * overhead:.1f} ms ({1e3 * lo:.1f} to {1e3 * hi:.1f})"
        if bound:
            ax.plot([1e3 * bound[1]] * 2, [yi - 0.4, yi + 0.4], color="black", linewidth=2)
            text += f"; link bound {1e3 * bound[1]:.1f} ms (black tick)"
        ends.append(1e3 * max(hi, bound[1] if bound else 0))
        ax.text(ends[-1] * 1.02, yi, " " + text, va="center", fontsize=9)
    ax.set_xlim(min(0, *(1e3 * (x.mean(lambda r: r.overhead("overhead_min")) or 0) for x in experiments)),
                max(ends + [1e-3]) * 1.7)
    save(fig, ax, path, "communication overhead per training step (ms): step minus the same step without "
         "communication", None, "Communication overhead, one yardstick for every method (PS vs All-Reduce vs DDP)")


def breakdown(x):
    """Milliseconds per step: data wait, the no-communication step, the overhead, and the rest."""
    step = x.mean(lambda r: r.metric("avg_batch_time")) or 0.0
    data = x.mean(lambda r: r.metric("avg_data_time")) or 0.0
    local = x.mean(lambda r: r.overhead("local_step_time"))
    overhead = x.mean(lambda r: r.overhead()) or 0.0
    if local is None:
        return {"data loading": data, "compute (no-communication step)": step - data,
                "communication overhead": 0.0, "other": 0.0}
    return {"data loading": data, "compute (no-communication step)": local,
            "communication overhead": max(0.0, overhead), "other": max(0.0, step - data - local - overhead)}


def plot_breakdown(experiments, path):
    fig, ax, y = bar_axes(experiments, 1.8)
    parts = [breakdown(x) for x in experiments]
    left = np.zeros(len(experiments))
    for name, colour in PHASE_COLOURS.items():
        w = np.array([1e3 * p[name] for p in parts])
        ax.barh(y, w, left=left, color=colour, edgecolor="white", label=name)
        left += w
    for yi, p, total in zip(y, parts, left):
        ax.text(total * 1.01, yi, f" {total:.0f} ms/step, overhead {100 * 1e3 * p['communication overhead'] / max(total, 1e-9):.0f}%",
                va="center", fontsize=9)
    ax.set_xlim(0, max(left) * 1.45 if max(left) > 0 else 1)
    save(fig, ax, path, "time per training step (ms); other = step - data - no-communication step - overhead",
         None, "Where a training step goes", dict(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4,
                                                   fontsize=9, frameon=False))


def scaling_groups(experiments):
    groups = collections.defaultdict(list)
    for x in experiments:
        groups[(x.kind, x.variant)].append(x)
    return {k: sorted(v, key=lambda x: x.world_size) for k, v in groups.items()
            if len({x.world_size for x in v}) > 1}


def plot_scaling(experiments, path):
    fig, ax = plt.subplots(figsize=(9, 5.5))
    sizes = set()
    for (kind, variant), group in scaling_groups(experiments).items():
        ws, thr = [x.world_size for x in group], [x.mean(THROUGHPUT) for x in group]
        name = KINDS[kind][0] + f" ({variant})"
        ideal = [thr[0] * x.trainers / group[0].trainers for x in group]
        ax.plot(ws, thr, marker="o", color=group[0].colour, linewidth=2, label=name)
        ax.plot(ws, ideal, linestyle=":", color=group[0].colour, label=f"{name}: linear in trainers")
        for x, t, i in list(zip(group, thr, ideal))[1:]:
            ax.annotate(f"{t:.0f} ({100 * t / i:.0f}%)", (x.world_size, t), textcoords="offset points",
                        xytext=(6, -4), fontsize=8)
        sizes.update(ws)
    ax.set_xticks(sorted(sizes))
    save(fig, ax, path, "processes (world size; a single PS trains on all but one)", "training throughput (img/s)",
         "Scaling: throughput vs processes (labels: img/s and % of linear from the smallest run)", dict(fontsize=8))


def bucket_groups(experiments):
    """{method name: [(bucket MiB, experiment)]} for DDP and the overlap mode run at several bucket sizes."""
    groups = collections.defaultdict(list)
    for x in experiments:
        d = x.first.data
        if (x.kind == "baseline_ddp" and d.get("comm_hook", "none") == "none") or \
                (x.kind == "all_reduce" and d.get("sync") == "overlap" and d.get("compress", "none") == "none"):
            groups[(KINDS[x.kind][0], x.world_size)].append((d.get("bucket_mb", 25.0), x))
    return {k: sorted(v, key=lambda t: t[0]) for k, v in groups.items() if len(v) > 1}


def plot_buckets(experiments, path):
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8))
    for (name, ws), group in bucket_groups(experiments).items():
        sizes = [s for s, _ in group]
        colour = group[0][1].colour
        a.plot(sizes, [x.mean(THROUGHPUT) for _, x in group], marker="o", color=colour, label=f"{name} ({ws} proc)")
        b.plot(sizes, [1e3 * (x.mean(lambda r: r.overhead()) or float("nan")) for _, x in group], marker="o",
               color=colour, label=f"{name} ({ws} proc)")
    for ax, ylabel in ((a, "throughput (img/s)"), (b, "communication overhead (ms/step)")):
        ax.set_xscale("log")
        ax.set_xlabel("bucket size (MiB, log scale)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, b, path, "bucket size (MiB, log scale)", "communication overhead (ms/step)",
         "Bucket size: throughput (left) and communication overhead (right)")


def plot_tradeoff(experiments, path):
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for x in experiments:
        thr = x.mean(THROUGHPUT)
        acc = x.mean(Run.final_accuracy) if not x.first.synthetic else None
        loss = x.mean(lambda r: r.metric("final_train_loss"))
        yv = acc if acc is not None else loss
        ax.scatter([thr], [yv], color=x.colour, s=80, edgecolor="black", label=x.label)
    synthetic = all(x.first.synthetic for x in experiments)
    save(fig, ax, path, "throughput (img/s)", "final training loss" if synthetic else "final val accuracy (%)",
         "Speed against accuracy (compression, async PS and their baselines)", dict(fontsize=8))


def make_plots(experiments, plots):
    plots.mkdir(parents=True, exist_ok=True)
    base = lambda x: baseline_for(x, experiments)  # noqa: E731
    bars(experiments, THROUGHPUT, plots / "throughput_comparison.png", "average training throughput (img/s)",
         "Throughput (higher is better; whiskers: ± sd over seeds; hatched: incomplete run)",
         lambda v, x: f"{v:.1f} img/s" + (f" ({v / base(x).mean(THROUGHPUT):.2f}x DDP)" if base(x) else ""))
    bars(experiments, lambda r: r.metric("avg_train_time_per_epoch"), plots / "training_time_comparison.png",
         "average training time per epoch (s)", "Training time per epoch (lower is better)", lambda v, x: f"{v:.2f} s")
    plot_loss(experiments, plots / "loss_curves.png")
    plot_accuracy(experiments, plots / "accuracy_curves.png")
    plot_comm(experiments, plots / "communication_overhead.png")
    plot_breakdown(experiments, plots / "time_breakdown.png")
    if scaling_groups(experiments):
        plot_scaling(experiments, plots / "scaling.png")
    if bucket_groups(experiments):
        plot_buckets(experiments, plots / "bucket_size.png")
    if has_tradeoffs(experiments):
        plot_tradeoff(experiments, plots / "speed_vs_accuracy.png")
    return sorted(plots.glob("*.png"))


# --------------------------------------------------------------------------- report
def context_lines(experiments):
    """The run context; a field that differs between runs is listed per experiment and flagged."""
    def network(d):
        n = d.get("network")
        return "loopback / not declared" if not n else \
            f"{n.get('topology') or 'declared link'} ({n.get('link_rate')}, {n.get('procs_per_node')} process(es) per node)"
    fields = [("dataset", lambda d: "{name} ({train_size} train / {val_size} val images, {num_classes} classes)"
               .format(**d["dataset"]) if isinstance(d.get("dataset"), dict) else None),
              ("model", lambda d: d.get("arch")), ("image size (px)", lambda d: d.get("image_size")),
              ("device", lambda d: d.get("device")), ("backend", lambda d: d.get("backend")),
              ("network", network), ("world size (processes)", lambda d: d.get("world_size")),
              ("batch size per trainer", lambda d: d.get("batch_size")), ("epochs", lambda d: len(d["epochs"])),
              ("learning rate", lambda d: "{lr} {lr_scheduler}, warm-up {lr_warmup_epochs} epochs".format(
                  **{"lr_scheduler": "constant", "lr_warmup_epochs": 0, **d.get("args", {})})),
              ("torch", lambda d: d.get("torch_version")), ("host", lambda d: d.get("host"))]
    lines, warn = [], []
    for name, get in fields:
        values = {x.label: get(x.first.data) for x in experiments}
        if len(set(map(str, values.values()))) == 1:
            lines.append(f"  {name}: {next(iter(values.values()))}")
        else:
            lines.append(f"  {name}: " + "; ".join(f"{k}: {v}" for k, v in values.items()))
            if name in ("dataset", "model", "image size (px)", "device", "backend", "network",
                        "batch size per trainer", "learning rate"):
                warn.append(name)
    lines.append("  seeds: " + "; ".join(f"{x.label}: {', '.join(map(str, x.seeds))}" for x in experiments))
    if warn:
        lines.append(f"  warning: runs differ in {', '.join(warn)}: compare them with care")
    return lines


def ms(seconds):
    return f"{1e3 * seconds:.1f} ms"


def throughput_lines(experiments):
    out = []
    for ws in sorted({x.world_size for x in experiments}):
        same = sorted([x for x in experiments if x.world_size == ws and x.complete], key=lambda x: -x.mean(THROUGHPUT))
        if len(same) < 2:
            continue
        best, t = same[0], same[0].mean(THROUGHPUT)
        parts = []
        for x in same[1:]:
            spread = math.hypot(best.spread(THROUGHPUT) or 0.0, x.spread(THROUGHPUT) or 0.0)
            parts.append(f"{t / x.mean(THROUGHPUT):.2f}x {x.label} ({x.mean(THROUGHPUT):.1f})" + (
                " (within the seed-to-seed spread)" if spread and t - x.mean(THROUGHPUT) <= 2 * spread else ""))
        out.append(f"- Throughput at {ws} processes: {best.label} is fastest at {t:.1f} img/s; that is "
                   + ", ".join(parts) + ".")
    return out


def overhead_lines(experiments):
    out = []
    for x in experiments:
        overhead = x.mean(lambda r: r.overhead())
        if overhead is None:
            out.append(f"- {x.label}: communication overhead not measured (--overhead-pairs 0).")
            continue
        lo, hi = x.mean(lambda r: r.overhead("overhead_min")), x.mean(lambda r: r.overhead("overhead_max"))
        step, eff = x.mean(lambda r: r.overhead("step_time")), x.mean(lambda r: r.metric("scaling_efficiency"))
        text = (f"- {x.label}: communication overhead {ms(overhead)} per step (min {ms(lo)}, max {ms(hi)} over "
                f"{x.first.data['comm_overhead']['pairs']} pairs) = {100 * overhead / step:.0f}% of its "
                f"{ms(step)} step" + ("; within noise of zero" if lo <= 0 <= hi else ""))
        if eff is not None:
            text += f"; scaling efficiency {100 * eff:.0f}%"
        blocking, hidden = x.mean(lambda r: r.overhead("blocking_overhead")), x.mean(lambda r: r.overhead("hidden_share"))
        if blocking is not None and hidden is not None:
            noise = max(hi - lo, x.mean(lambda r: r.overhead("blocking_overhead_max") - r.overhead("blocking_overhead_min")))
            text += f"; the same buckets exchanged blocking after backward cost {ms(blocking)}, " + (
                f"so {100 * hidden:.0f}% is hidden behind backward (both measured in this run)"
                if abs(blocking - overhead) > noise else
                f"the same as overlapped within noise (spread {ms(noise)}): no measurable share is hidden here")
        traced = next((e["profile"] for e in x.first.epochs if isinstance(e.get("profile"), dict)), None)
        if traced:
            text += (f"; its profiler trace ({traced['steps']} steps, {traced['comm_source']}) shows "
                     f"{100 * traced['overlap_share']:.0f}% of {ms(traced['comm_time'])} of communication "
                     "overlapping compute")
        out.append(text + ".")
    for x in experiments:  # against DDP's, with the spreads as the noise
        ref = baseline_for(x, experiments)
        a, b = x.mean(lambda r: r.overhead()), ref and ref.mean(lambda r: r.overhead())
        if ref is None or ref is x or a is None or b is None:
            continue
        noise = max((x.mean(lambda r: r.overhead("overhead_max")) - x.mean(lambda r: r.overhead("overhead_min"))),
                    (ref.mean(lambda r: r.overhead("overhead_max")) - ref.mean(lambda r: r.overhead("overhead_min"))))
        if abs(a - b) <= noise:
            out.append(f"- {x.label} vs {ref.label}: overheads {ms(a)} and {ms(b)} are within noise (the "
                       f"difference, {ms(abs(a - b))}, is inside the pairs' spread of {ms(noise)}).")
        else:
            out.append(f"- {x.label} vs {ref.label}: overhead {ms(a)} against {ms(b)} "
                       f"({a / b:.2f}x; beyond the pairs' spread of {ms(noise)})." if b > 0 else
                       f"- {x.label} vs {ref.label}: overhead {ms(a)} against {ms(b)}.")
    return out


def convergence_lines(experiments):
    """Each experiment's loss curve against the DDP doing the same math, judged against the seed-to-seed
    spread (the noise floor); with one seed the verdict has no floor and says so."""
    out = []
    for x in experiments:
        ref = twin_ddp(x, experiments) or baseline_for(x, experiments)
        grid = ref and ref is not x and common_grid(x, ref)
        if grid is None or grid is False:
            continue
        diff = float(np.mean(np.abs(curves_on(grid, x).mean(0) - curves_on(grid, ref).mean(0))))
        floors = [f for f in (seed_floor(x, grid), seed_floor(ref, grid)) if f is not None]
        text = f"- Loss curves: {x.label} vs {ref.label}: the (mean) smoothed curves differ by {diff:.4f} on average"
        same_math = x.trainers == ref.trainers and x.batch_size == ref.batch_size and \
            x.first.data.get("compress", "none") == "none" and x.first.data.get("comm_hook", "none") == "none"
        if floors:
            floor = max(floors)
            if diff <= floor:
                text += f", within the seed-to-seed spread of {floor:.4f} (the noise floor): they agree"
            elif x.kind == "all_reduce" and same_math:
                text += (f", {diff / floor:.1f}x the seed-to-seed spread of {floor:.4f}: RED FLAG, the manual "
                         "all-reduce is the same math as DDP (its tests prove it), so check the run or the method")
            else:
                text += f", {diff / floor:.1f}x the seed-to-seed spread of {floor:.4f}: beyond the noise floor"
        else:
            _, ya = loss_curve(x.first)
            _, yb = loss_curve(ref.first)
            n = min(len(ya), len(yb))
            agree = int(np.argmax(np.abs(ya[:n] - yb[:n]) > 1e-3 * np.abs(yb[:n]))) if n else 0
            agree = n if n and np.all(np.abs(ya[:n] - yb[:n]) <= 1e-3 * np.abs(yb[:n])) else agree
            if same_math and agree:
                text += f"; step by step the losses match for the first {agree} of {n} steps (the same math)"
            elif agree:
                text += f"; step by step the losses match for the first {agree} of {n} steps"
            text += ("; one seed each, so there is no noise floor to judge the rest against (run_all.sh "
                     "--seeds \"0 1 2\" gives one)")
        if x.trainers != ref.trainers or x.batch_size != ref.batch_size:
            text += " (it trains on a different global batch and data split)"
        fa, fb = x.mean(Run.best_accuracy), ref.mean(Run.best_accuracy)
        if fa is not None and fb is not None:
            text += f"; best val accuracy {fmt_mean(x, Run.best_accuracy)}% vs {fmt_mean(ref, Run.best_accuracy)}%"
        out.append(text + ".")
    return out


def ps_lines(experiments):
    """The single server's bottleneck, argued from the mode and the measurements."""
    out = []
    for x in [x for x in experiments if x.kind == "ps"]:
        d, w = x.first.data, x.trainers
        pull, push = x.mean(lambda r: r.metric("avg_comm_time_pull")), x.mean(lambda r: r.metric("avg_comm_time_push"))
        model_mb = d.get("state_bytes", 0) / 1e6
        if d.get("servers", "1") != "1":
            text = (f"- Sharded PS ({x.label}): every rank serves 1/{x.world_size} of the parameters, so each link "
                    f"carries about 2(N-1)/N of the {model_mb:.0f} MB model per step, as a ring all-reduce does")
        elif x.variant.startswith("p2p"):
            text = (f"- PS bottleneck ({x.label}): a star: every step the server sends the whole {model_mb:.0f} MB state "
                    f"to each of its {w} workers and receives each one's gradients, tensor by tensor, so its link "
                    f"carries {2 * w} model copies per step, while a ring all-reduce rank moves 2(N-1)/N (under 2)")
        else:
            text = (f"- PS exchange ({x.label}): packed buckets, dist.broadcast from the server and dist.reduce to it; "
                    "how many bytes cross the server's link is the backend's choice, not necessarily one copy per "
                    "worker")
        link = link_bound(x)
        if link:
            (sent, received), seconds, _, _ = link
            text += (f"; measured on the {d['network'].get('link_rate')} links: the busiest node link sent "
                     f"{sent / 1e6:.1f} MB and received {received / 1e6:.1f} MB per step "
                     f"({max(sent, received) / 1e6 / model_mb:.2f}x the model), {ms(seconds)} at the link rate"
                     if model_mb else "")
        elif not x.variant.startswith("p2p"):
            text += "; not measured here (no declared link: run it on emulate_cluster.sh to count the bytes)"
        if pull is not None and push is not None:
            text += f"; workers wait {ms(pull)} to pull and {ms(push)} to push per step"
        update = x.mean(lambda r: r.metric("avg_server_update_time"))
        if update is not None and d.get("mode", "sync") == "sync":
            text += f", and {ms(update)} per step for the server to aggregate and update while every worker waits"
        out.append(text + ".")
    for x in [x for x in experiments if x.kind == "ps" and not x.variant.startswith("p2p")]:
        p2p = next((p for p in experiments if p.kind == "ps" and p.variant == "p2p" and p.world_size == x.world_size), None)
        a, b = x.mean(lambda r: r.overhead()), p2p and p2p.mean(lambda r: r.overhead())
        if a is not None and b:
            out.append(f"- PS at {x.world_size} processes: {x.variant} communication overhead is {a / b:.2f}x the "
                       f"guide's per-tensor p2p ({ms(a)} vs {ms(b)}).")
    return out


def link_lines(experiments):
    out = []
    for x in experiments:
        bound = link_bound(x)
        overhead = x.mean(lambda r: r.overhead())
        if bound is None or overhead is None:
            continue
        (sent, received), seconds, predicted, how = bound
        text = (f"- Link bound, {x.label}: the busiest link carried {sent / 1e6:.1f} MB out and {received / 1e6:.1f} MB "
                f"in per step, {ms(seconds)} at {x.first.data['network'].get('link_rate')} "
                + ("(pull, then push: the two one after the other)" if x.kind == "ps" else
                   "(both directions at once)") + f"; the measured overhead, {ms(overhead)}, is "
                f"{overhead / seconds:.2f}x that bound")
        if predicted:
            text += f" ({how} predicts {predicted / 1e6:.1f} MB per direction: measured {max(sent, received) / predicted:.2f}x)"
        out.append(text + ".")
    return out


def tradeoff_lines(experiments):
    """Did compression or asynchrony pay off on this link: speed and accuracy against the plain variant."""
    out = []
    for x in experiments:
        d = x.first.data
        if x.kind == "all_reduce" and d.get("compress", "none") != "none":
            plain = [p for p in experiments if p.kind == x.kind and p.first.data.get("sync") == d.get("sync")
                     and p.first.data.get("compress", "none") == "none" and p.world_size == x.world_size]
        elif x.kind == "baseline_ddp" and d.get("comm_hook", "none") != "none":
            plain = [p for p in experiments if p.kind == x.kind and p.first.data.get("comm_hook", "none") == "none"
                     and p.world_size == x.world_size and p.first.data.get("bucket_mb") == d.get("bucket_mb")]
        elif x.kind == "ps" and d.get("mode") == "async":
            plain = [p for p in experiments if p.kind == "ps" and p.first.data.get("mode", "sync") == "sync"
                     and p.first.data.get("comm") == d.get("comm") and p.world_size == x.world_size]
        else:
            continue
        if not plain:
            continue
        p = plain[0]
        speed = x.mean(THROUGHPUT) / p.mean(THROUGHPUT)
        text = f"- {x.label} against {p.label}: {speed:.2f}x the throughput"
        sd = math.hypot(x.spread(THROUGHPUT) or 0.0, p.spread(THROUGHPUT) or 0.0)
        faster = abs(x.mean(THROUGHPUT) - p.mean(THROUGHPUT)) > 2 * sd if sd else None  # None: no floor
        oa, ob = x.mean(lambda r: r.overhead()), p.mean(lambda r: r.overhead())
        if oa is not None and ob:
            noise = max(x.mean(lambda r: r.overhead("overhead_max") - r.overhead("overhead_min")),
                        p.mean(lambda r: r.overhead("overhead_max") - r.overhead("overhead_min")))
            text += f", communication overhead {ms(oa)} vs {ms(ob)} ({100 * (oa / ob - 1):+.0f}%" + (
                ", within the pairs' spread)" if abs(oa - ob) <= noise else ")")
            faster = faster if faster is not None else abs(oa - ob) > noise
        if d.get("mode") == "async":
            text += (f", staleness {x.mean(lambda r: r.metric('staleness_mean')):.2f} updates on average "
                     f"(max {x.mean(lambda r: r.metric('staleness_max')):.0f})")
        acc_x, acc_p = x.mean(Run.final_accuracy), p.mean(Run.final_accuracy)
        floor = max([s for s in (x.spread(Run.final_accuracy), p.spread(Run.final_accuracy)) if s] or [0.0])
        if acc_x is not None and acc_p is not None:
            text += f"; final val accuracy {acc_x:.2f}% vs {acc_p:.2f}%" + (
                f" (seed spread {floor:.2f} points)" if floor else " (one seed: no noise floor)")
            cost = acc_p - acc_x > (2 * floor if floor else 1.0)
        else:
            la, lb = x.mean(lambda r: r.metric("final_train_loss")), p.mean(lambda r: r.metric("final_train_loss"))
            text += f"; final train loss {la:.4f} vs {lb:.4f}"
            cost = la > lb * 1.02
        gain = bool(faster) and speed > 1
        verdict = ("paid off" if not cost else "bought speed at an accuracy cost") if gain else \
            "made no difference beyond noise" if not faster else "did not pay off"
        out.append(text + f": on this link it {verdict}.")
    return out


def scaling_lines(experiments):
    out = []
    for (kind, variant), group in scaling_groups(experiments).items():
        a, b = group[0], group[-1]
        ta, tb = a.mean(THROUGHPUT), b.mean(THROUGHPUT)
        eff = tb / (ta * b.trainers / a.trainers)
        out.append(f"- Scaling {KINDS[kind][0]} ({variant}): {ta:.1f} img/s at {a.world_size} processes -> "
                   f"{tb:.1f} at {b.world_size} ({100 * eff:.0f}% of linear in trainers).")
    return out


def analysis(experiments):
    """Observations computed from the numbers; nothing here is asserted without a figure behind it."""
    out = (throughput_lines(experiments) + overhead_lines(experiments) + convergence_lines(experiments)
           + ps_lines(experiments) + link_lines(experiments) + tradeoff_lines(experiments) + scaling_lines(experiments))
    if any(x.kind == "ps" and x.trainers < x.world_size for x in experiments):
        out.append("- Note: a single-server PS trains on world_size - 1 processes, so its global batch is "
                   "num_workers x batch (see Trainers x batch): compare its curves with the DDP of as many trainers.")
    for x in experiments:
        for r in x.runs:
            if not r.complete:
                out.append(f"- {x.label}: {r.path.name} has status {r.data.get('status')!r} with {len(r.epochs)} "
                           "epoch(s) recorded; its numbers cover only those epochs.")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results-dir", default="./", help="folder holding the results_*.json files")
    p.add_argument("--out-dir", default="./", help="where performance_report.txt, report_tables.md and plots/ go")
    args = p.parse_args(argv)
    if not Path(args.results_dir).is_dir():
        print(f"error: --results-dir {args.results_dir} does not exist (pass the folder with results_*.json)",
              file=sys.stderr)
        return 1
    experiments, skipped = load_all(args.results_dir)
    if not experiments:
        print(f"error: no usable results_*.json in {Path(args.results_dir).resolve()} "
              "(run the experiments first, e.g. bash run_all.sh)", file=sys.stderr)
        return 1
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = [("Performance comparison", performance_table(experiments)),
              ("Communication per training step", comm_table(experiments))]
    if link_table(experiments)[1]:
        tables.append(("Communication against the link", link_table(experiments)))
    if has_tradeoffs(experiments):
        tables.append(("Speed and accuracy", tradeoff_table(experiments)))
    text = "\n\n".join(f"{title}\n{render_text(*table)}" + (f"\n{COMM_NOTE}" if "Communication per" in title else "")
                       for title, table in tables)
    speedups = "\n".join(f"  {row[0]}: {row[4]}" for row in tables[0][1][1])
    text += f"\n\nSpeedup relative to Baseline DDP (same world size)\n{speedups}"
    print(text)
    pngs = make_plots(experiments, out / "plots")
    report = [f"Distributed training performance report ({time.strftime('%Y-%m-%d %H:%M:%S')})", "",
              "Run context", *context_lines(experiments),
              "  files: " + ", ".join(r.path.name for x in experiments for r in x.runs), "",
              *([f"Skipped files: {'; '.join(skipped)}", ""] if skipped else []),
              text, "", "Analysis (computed from the numbers above)", *analysis(experiments), "",
              "Plots: " + ", ".join(f"plots/{p.name}" for p in pngs)]
    (out / "performance_report.txt").write_text("\n".join(report) + "\n")
    (out / "report_tables.md").write_text("\n\n".join(
        f"### {title}\n\n{render_markdown(*table)}" + (f"\n\n{COMM_NOTE}" if "Communication per" in title else "")
        for title, table in tables) + "\n")
    print(f"\nwrote {out / 'performance_report.txt'}, {out / 'report_tables.md'} and {len(pngs)} plots in {out / 'plots'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
