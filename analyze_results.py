"""Compares the three methods' results: terminal tables, plots and a written report.

    python analyze_results.py [--results-dir ./] [--out-dir ./]

Reads every results_*.json in --results-dir and writes <out-dir>/plots/*.png, performance_report.txt and
report_tables.md. A method and its variant come from each file's content (kind, sync, comm, world_size),
never from its name; a file that cannot be read is named in one line and skipped; a run that did not
finish is kept but marked "(incomplete)" everywhere.
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

# kind: (display name, colour map of its variants, variant order; the first is the script's default)
KINDS = {
    "baseline_ddp": ("Baseline DDP", "Blues", [None]),
    "all_reduce": ("Manual All-Reduce", "Oranges", ["overlap", "bucketed", "per-param", "ring"]),
    "ps": ("Parameter Server", "Greens", ["collective", "p2p", "overlap"]),
}
EPOCH_KEYS = ("epoch", "train_loss", "train_accuracy", "train_time", "train_throughput", "avg_batch_time")
PHASE_COLOURS = {"compute": "#555555", "exposed comm": "#d62728", "data loading": "#bbbbbb", "update": "#9467bd"}


# --------------------------------------------------------------------------- loading
@dataclasses.dataclass
class Run:
    data: dict
    path: Path
    kind: str
    variant: str
    label: str = ""
    colour: tuple = (0, 0, 0)

    @property
    def complete(self):
        return self.data.get("status") == "complete"

    @property
    def world_size(self):
        return self.data["world_size"]

    @property
    def trainers(self):
        """Processes that compute gradients: all of them, except the PS server."""
        return self.data.get("num_workers", self.world_size - 1) if self.kind == "ps" else self.world_size

    @property
    def epochs(self):
        return self.data["epochs"]

    def metric(self, key):
        """A summary average as the file states it, else the mean over its epochs, else None."""
        value = self.data.get("summary", {}).get(key)
        if isinstance(value, (int, float)):
            return float(value)
        key = {"avg_train_throughput": "train_throughput", "avg_train_time_per_epoch": "train_time"}.get(key, key)
        values = [e[key] for e in self.epochs if isinstance(e.get(key), (int, float))]
        return statistics.mean(values) if values and len(values) == len(self.epochs) else None


def infer_kind(data):
    """The method kind from the JSON's "kind", or from its method name in files written before it existed."""
    if data.get("kind"):
        return data["kind"]
    method = str(data.get("method", "")).lower()
    return ("baseline_ddp" if "ddp" in method else "all_reduce" if "all-reduce" in method
            else "ps" if "parameter server" in method else None)


def load_run(path):
    """One results file as a Run; raises ValueError saying what is wrong with it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    kind = infer_kind(data)
    if kind not in KINDS:
        raise ValueError(f"unknown method kind {kind!r} (expected one of {', '.join(KINDS)})")
    for key in ("world_size", "batch_size"):
        if not isinstance(data.get(key), int) or data[key] < 1:
            raise ValueError(f"missing or invalid {key!r}")
    epochs = data.get("epochs")
    if not isinstance(epochs, list) or not epochs:
        raise ValueError("no finished epoch")
    for i, e in enumerate(epochs):
        bad = [k for k in EPOCH_KEYS if not isinstance(e, dict) or not isinstance(e.get(k), (int, float))
               or not math.isfinite(e[k])]
        if bad:
            raise ValueError(f"epoch {i + 1} lacks valid {', '.join(bad)}")
    args = data.get("args", {}) if isinstance(data.get("args"), dict) else {}
    if kind == "all_reduce":
        variant = data.get("sync") or args.get("sync") or "overlap"
    elif kind == "ps":
        variant = data.get("comm") or args.get("comm") or "collective"
        mode = data.get("mode") or args.get("mode") or "sync"
        variant += "" if mode == "sync" else f", {mode}"
    else:
        variant = None
    return Run(data, path, kind, variant)


def load_all(results_dir):
    """Every readable results_*.json in the folder, ordered and labelled; prints one line per skipped file."""
    runs, skipped = [], []
    for path in sorted(Path(results_dir).glob("results_*.json")):
        try:
            runs.append(load_run(path))
        except ValueError as e:
            skipped.append(f"{path.name}: {e}")
            print(f"skipped {path.name}: {e}", file=sys.stderr)

    def order(run):
        variants = KINDS[run.kind][2]
        rank = variants.index(run.variant) if run.variant in variants else len(variants)
        return list(KINDS).index(run.kind), rank, str(run.variant), run.world_size, run.path.name
    runs.sort(key=order)
    several_sizes = len({r.world_size for r in runs}) > 1
    for run in runs:
        name = KINDS[run.kind][0] + (f" ({run.variant})" if run.variant else "")
        run.label = name + (f" [{run.world_size} proc]" if several_sizes else "")
    counts = collections.Counter(r.label for r in runs)
    for run in runs:  # two files of the same method, variant and size: tell them apart by file
        run.label += f" <{run.path.name}>" if counts[run.label] > 1 else ""
    for run in runs:
        run.label += "" if run.complete else " (incomplete)"
    for kind, (_, cmap, _) in KINDS.items():  # one colour per method variant, shades of one hue per method
        variants = list(dict.fromkeys(r.variant for r in runs if r.kind == kind))
        for i, variant in enumerate(variants):
            shade = 0.85 - 0.3 * i / max(1, len(variants) - 1)
            for r in runs:
                if r.kind == kind and r.variant == variant:
                    r.colour = plt.get_cmap(cmap)(shade)
    return runs, skipped


# --------------------------------------------------------------------------- derived numbers
Comm = collections.namedtuple("Comm", "pull push allreduce total ops")


def comm_times(run):
    """Seconds per step (None where not measured): PS pull and push, all-reduce, the exposed total a step
    waits on, and the communication ops' own time including what overlaps backward."""
    pull, push = run.metric("avg_comm_time_pull"), run.metric("avg_comm_time_push")
    if run.kind == "ps":
        total = pull + push if pull is not None and push is not None else run.metric("avg_comm_time")
        return Comm(pull, push, None, total, total)
    exposed = run.metric("avg_comm_time")
    if exposed is None and run.kind == "baseline_ddp":  # DDP's calibrated exposed communication
        exposed = run.data.get("comm_calibration", {}).get("exposed_comm_time")
    return Comm(None, None, exposed, exposed, run.metric("avg_comm_op_time"))


def breakdown(run):
    """Seconds per step spent in each phase; compute is the rest of the step, so the parts add up."""
    step = run.metric("avg_batch_time")
    data = run.metric("avg_data_time") or 0.0
    comm = comm_times(run).total or 0.0
    updates = [e.get("phase_times", {}).get("update", 0.0) for e in run.epochs]
    update = statistics.mean(updates)
    return {"compute": max(0.0, step - data - comm - update), "exposed comm": comm,
            "data loading": data, "update": update}


def is_synthetic(run):
    return bool(run.data.get("args", {}).get("synthetic")) or "synthetic" in str(run.data.get("dataset"))


def best_accuracy(run):
    if is_synthetic(run):
        return None  # random labels: accuracy means nothing
    best = run.metric("best_val_accuracy")
    vals = [e["val_accuracy"] for e in run.epochs if isinstance(e.get("val_accuracy"), (int, float))]
    return best if best is not None else (max(vals) if vals else None)


def baseline_for(run, runs):
    """The DDP run this one's speedup is relative to: same world size, complete ones first."""
    ddps = [r for r in runs if r.kind == "baseline_ddp" and r.world_size == run.world_size]
    return sorted(ddps, key=lambda r: not r.complete)[0] if ddps else None


def loss_curve(run):
    """(epoch position, per-step loss) of the whole run; x in epochs so runs with other step counts line up."""
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


def smoothing_window(run):
    """About a quarter of an epoch's steps (1, no smoothing, for short epochs)."""
    steps = sum(len(e.get("all_losses") or []) for e in run.epochs)
    return max(1, min(steps // 4, round(steps / len(run.epochs) / 4)))


def smoothed_curve(run):
    x, y = loss_curve(run)
    return x, smooth(y, smoothing_window(run))


def curve_difference(run, ref):
    """Mean |difference| of the smoothed loss curves over their common epochs, relative to the reference."""
    (xa, ya), (xb, yb) = smoothed_curve(run), smoothed_curve(ref)
    if len(xa) < 2 or len(xb) < 2:
        return None
    lo, hi = max(xa[0], xb[0]), min(xa[-1], xb[-1])
    if hi <= lo:
        return None
    grid = np.linspace(lo, hi, 200)
    a, b = np.interp(grid, xa, ya), np.interp(grid, xb, yb)
    return float(np.mean(np.abs(a - b)) / np.mean(np.abs(b)))


# --------------------------------------------------------------------------- tables
def fmt(value, digits=2, scale=1.0):
    return "-" if value is None else f"{value * scale:.{digits}f}"


def performance_table(runs):
    headers = ["Method", "Avg throughput (img/s)", "Avg train time/epoch (s)", "Best accuracy (%)",
               "Relative speedup", "Trainers x batch"]
    rows = []
    for r in runs:
        base = baseline_for(r, runs)
        thr = r.metric("avg_train_throughput")
        speed = ("1.00x (baseline)" if base is r else f"{thr / base.metric('avg_train_throughput'):.2f}x"
                 if base else "n/a (no DDP run)")
        acc = best_accuracy(r)
        setup = f"{r.trainers} x {r.data['batch_size']}" + (" (+1 server)" if r.kind == "ps" else "")
        rows.append([r.label, fmt(thr, 1), fmt(r.metric("avg_train_time_per_epoch")),
                     "n/a (synthetic)" if is_synthetic(r) else fmt(acc),
                     speed, setup])
    return headers, rows


def comm_table(runs):
    headers = ["Method", "Param pull (ms)", "Grad push (ms)", "All-Reduce (ms)", "Total comm (ms)",
               "Comm ops incl. hidden (ms)", "Share of step (%)"]
    rows = []
    for r in runs:
        pull, push, allreduce, total, ops = comm_times(r)
        step = r.metric("avg_batch_time")
        total_cell = (f"{fmt(pull, scale=1e3)} + {fmt(push, scale=1e3)} = {fmt(total, scale=1e3)}"
                      if pull is not None and push is not None else fmt(total, scale=1e3))
        if r.kind == "baseline_ddp" and allreduce is not None:
            total_cell += " (exposed, measured)"
        share = fmt(total / step, 1, 100) if total is not None and step else "-"
        rows.append([r.label, fmt(pull, scale=1e3), fmt(push, scale=1e3), fmt(allreduce, scale=1e3),
                     total_cell, fmt(ops, scale=1e3), share])
    return headers, rows


def render_text(headers, rows):
    widths = [max(len(c) for c in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def render_markdown(headers, rows):
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * len(headers)) + "|",
                      *("| " + " | ".join(r) + " |" for r in rows)])


COMM_NOTE = ("Times are per training step, as each method's rank 0 (PS: worker rank 1) measured them. "
             "Total comm is the communication a step waits on (exposed): for DDP, forward+backward with "
             "gradient sync minus the same under no_sync(); for Manual All-Reduce, the wait after backward; "
             "for the PS, pull plus push. Comm ops incl. hidden also counts communication overlapped with "
             "backward.")


# --------------------------------------------------------------------------- plots
def bar_axes(runs, extra_height=1.2):
    """A figure with one horizontal bar row per run, top to bottom, labelled with the run."""
    fig, ax = plt.subplots(figsize=(10, extra_height + 0.55 * len(runs)))
    y = np.arange(len(runs))[::-1]
    ax.set_yticks(y, [r.label for r in runs])
    for tick, r in zip(ax.get_yticklabels(), runs):
        tick.set_color(r.colour)
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


def _bars(runs, values, path, xlabel, title, text):
    """A horizontal bar per run in its colour; incomplete runs hatched; the value written on each bar."""
    fig, ax, y = bar_axes(runs)
    vals = [v or 0.0 for v in values]
    for yi, v, r in zip(y, values, runs):
        ax.barh(yi, v or 0, color=r.colour, edgecolor="black", linewidth=0.6, hatch=None if r.complete else "//")
        ax.text((v or 0) + max(vals) * 0.01, yi, text(v, r), va="center", fontsize=9)
    ax.set_xlim(0, max(vals) * 1.35 if max(vals) > 0 else 1)
    save(fig, ax, path, xlabel, None, title)


def line_widths(runs):
    """Widest first, so that curves that coincide (same math) stay visible as nested lines."""
    return np.linspace(5, 1.5, len(runs)) if len(runs) > 1 else [2]


NESTED_LEGEND = dict(fontsize=8, title="curves that coincide nest (wider drawn first)", title_fontsize=8,
                     loc="upper left", bbox_to_anchor=(1.01, 1))


def plot_loss(runs, path):
    fig, ax = plt.subplots(figsize=(11, 5.5))
    for r, width in zip(runs, line_widths(runs)):
        x, y = loss_curve(r)
        if len(y):
            ax.plot(x, y, color=r.colour, alpha=0.2, linewidth=0.8)
            ax.plot(*smoothed_curve(r), color=r.colour, linewidth=width, label=r.label,
                    linestyle="-" if r.complete else "--")
    smoothed = any(smoothing_window(r) > 1 for r in runs)
    save(fig, ax, path, "epoch (per-step losses, each run's steps spread over its epoch)",
         "training loss (cross-entropy)", "Training loss per step" + (
             " (faint: raw, bold: moving average over ~1/4 epoch)" if smoothed else "")
         + ("; dashed: incomplete run" if not all(r.complete for r in runs) else ""), NESTED_LEGEND)


def plot_accuracy(runs, path):
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, key, title in zip(axes, ("train_accuracy", "val_accuracy"), ("Training accuracy", "Validation accuracy")):
        for i, (r, width) in enumerate(zip(runs, line_widths(runs))):
            pts = [(e["epoch"], e[key]) for e in r.epochs if isinstance(e.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="osD^vPX"[i % 7], markersize=2.5 * width + 2, linewidth=width,
                        color=r.colour, label=r.label, linestyle="-" if r.complete else "--")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    save(fig, axes[1], path, "epoch", None, "Validation accuracy", NESTED_LEGEND)  # the figure, both panels


def plot_comm(runs, path):
    fig, ax, y = bar_axes(runs, 1.6)
    ends = []
    for yi, r in zip(y, runs):
        pull, push, _, total, ops = comm_times(r)
        style = dict(color=r.colour, edgecolor="black", linewidth=0.6, hatch=None if r.complete else "//")
        if ops and total is not None and ops > total * 1.01:  # all comm op time, partly behind backward
            ax.barh(yi, ops * 1e3, color="none", edgecolor=r.colour, linestyle="--", linewidth=1.5)
        if pull is not None and push is not None:
            ax.barh(yi, pull * 1e3, **style)
            ax.barh(yi, push * 1e3, left=pull * 1e3, alpha=0.55, **{**style, "hatch": style["hatch"] or ".."})
            text = f"{total * 1e3:.1f} ms (pull {pull * 1e3:.1f} + push {push * 1e3:.1f})"
        else:
            ax.barh(yi, (total or 0) * 1e3, **style)
            text = "not measured" if total is None else f"{total * 1e3:.1f} ms" + (
                f" (ops {ops * 1e3:.1f} ms, rest hidden)" if ops and ops > total * 1.01 else "")
        ends.append(max(total or 0, ops or 0) * 1e3)
        ax.text(ends[-1] * 1.01, yi, " " + text, va="center", fontsize=9)
    ax.set_xlim(0, max(ends + [1e-3]) * 1.6)
    save(fig, ax, path, "communication a training step waits on (ms per step)", None,
         "Communication overhead: PS pull (solid) + push (dotted fill) vs all-reduce vs DDP\n"
         "dashed outline: all communication op time, including what overlaps backward")


def plot_breakdown(runs, path):
    fig, ax, y = bar_axes(runs, 1.8)
    parts = [breakdown(r) for r in runs]
    left = np.zeros(len(runs))
    for name, colour in PHASE_COLOURS.items():
        widths = np.array([p[name] * 1e3 for p in parts])
        ax.barh(y, widths, left=left, color=colour, edgecolor="white", label=name)
        left += widths
    for yi, p, total in zip(y, parts, left):
        ax.text(total * 1.01, yi, f" {total:.1f} ms/step, comm {100 * p['exposed comm'] * 1e3 / total:.0f}%",
                va="center", fontsize=9)
    ax.set_xlim(0, max(left) * 1.45)
    save(fig, ax, path, "time per training step (ms); compute = step - data - comm - update", None,
         "Where a training step goes", dict(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, fontsize=9,
                                            frameon=False))  # between the title and the bars


def scaling_groups(runs):
    """{(kind, variant): runs sorted by world size} for methods measured at several world sizes."""
    groups = {}
    for r in runs:
        groups.setdefault((r.kind, r.variant), []).append(r)
    return {k: sorted(v, key=lambda r: r.world_size) for k, v in groups.items()
            if len({r.world_size for r in v}) > 1}


def plot_scaling(runs, path):
    fig, ax = plt.subplots(figsize=(9, 5.5))
    sizes = set()
    for (kind, variant), group in scaling_groups(runs).items():
        ws, thr = [r.world_size for r in group], [r.metric("avg_train_throughput") for r in group]
        name = KINDS[kind][0] + (f" ({variant})" if variant else "")
        ideal = [thr[0] * r.trainers / group[0].trainers for r in group]
        ax.plot(ws, thr, marker="o", color=group[0].colour, linewidth=2, label=name)
        ax.plot(ws, ideal, linestyle=":", color=group[0].colour, label=f"{name}: ideal (linear in trainers)")
        for r, t, i in list(zip(group, thr, ideal))[1:]:
            ax.annotate(f"{t:.0f} ({100 * t / i:.0f}%)" + ("" if r.complete else " incomplete"),
                        (r.world_size, t), textcoords="offset points", xytext=(6, -4), fontsize=8)
        sizes.update(ws)
    ax.set_xticks(sorted(sizes))
    save(fig, ax, path, "processes (world size; the PS trains on all but one)", "training throughput (img/s)",
         "Scaling: throughput vs processes (labels: img/s and % of ideal from the smallest run)",
         dict(fontsize=8))


def make_plots(runs, plots):
    plots.mkdir(parents=True, exist_ok=True)
    thr = [r.metric("avg_train_throughput") for r in runs]
    _bars(runs, thr, plots / "throughput_comparison.png", "average training throughput (img/s)",
          "Throughput (higher is better; hatched: incomplete run)",
          lambda v, r: f"{v:.1f} img/s" + (f" ({v / baseline_for(r, runs).metric('avg_train_throughput'):.2f}x DDP)"
                                           if baseline_for(r, runs) else ""))
    _bars(runs, [r.metric("avg_train_time_per_epoch") for r in runs], plots / "training_time_comparison.png",
          "average training time per epoch (s)", "Training time per epoch (lower is better)",
          lambda v, r: f"{v:.2f} s")
    plot_loss(runs, plots / "loss_curves.png")
    plot_accuracy(runs, plots / "accuracy_curves.png")
    plot_comm(runs, plots / "communication_overhead.png")
    plot_breakdown(runs, plots / "time_breakdown.png")
    if scaling_groups(runs):
        plot_scaling(runs, plots / "scaling.png")
    return sorted(plots.glob("*.png"))


# --------------------------------------------------------------------------- report
def context_lines(runs):
    """The run context; a field that differs between runs is listed per run and flagged."""
    fields = [("dataset", lambda d: "{name} ({train_size} train / {val_size} val images, {num_classes} classes)"
               .format(**d["dataset"]) if isinstance(d.get("dataset"), dict) else None),
              ("model", lambda d: d.get("arch")), ("image size (px)", lambda d: d.get("image_size")),
              ("device", lambda d: d.get("device")), ("backend", lambda d: d.get("backend")),
              ("world size (processes)", lambda d: d.get("world_size")),
              ("batch size per trainer", lambda d: d.get("batch_size")),
              ("epochs", lambda d: len(d["epochs"])), ("torch", lambda d: d.get("torch_version")),
              ("host", lambda d: d.get("host"))]
    lines, warn = [], []
    for name, get in fields:
        values = {r.label: get(r.data) for r in runs}
        if len(set(map(str, values.values()))) == 1:
            lines.append(f"  {name}: {next(iter(values.values()))}")
        else:
            lines.append(f"  {name}: " + "; ".join(f"{k}: {v}" for k, v in values.items()))
            if name in ("dataset", "model", "image size (px)", "device", "backend", "batch size per trainer"):
                warn.append(name)
    lines += [f"  dates: {r.label}: {r.data.get('start_time')} to {r.data.get('end_time')}" for r in runs]
    if warn:
        lines.append(f"  warning: runs differ in {', '.join(warn)}: compare them with care")
    return lines


def analysis(runs):
    """Observations computed from the numbers; nothing here is asserted without a figure behind it."""
    out = []
    for ws in sorted({r.world_size for r in runs}):
        same = sorted([r for r in runs if r.world_size == ws and r.complete],
                      key=lambda r: -r.metric("avg_train_throughput"))
        if len(same) > 1:
            best = same[0]
            t = best.metric("avg_train_throughput")
            others = ", ".join(f"{t / r.metric('avg_train_throughput'):.2f}x {r.label} "
                               f"({r.metric('avg_train_throughput'):.1f})" for r in same[1:])
            out.append(f"- Throughput at {ws} processes: {best.label} is fastest at {t:.1f} img/s; "
                       f"that is {others}.")
    for r in runs:
        pull, push, _, total, ops = comm_times(r)
        step = r.metric("avg_batch_time")
        if total is None or not step:
            out.append(f"- {r.label}: communication time not recorded.")
            continue
        text = f"- {r.label}: {1e3 * total:.1f} ms of its {1e3 * step:.1f} ms step waits on communication " \
               f"({100 * total / step:.0f}%)"
        if r.kind == "ps" and pull is not None:
            text += f": pull {1e3 * pull:.1f} ms + push {1e3 * push:.1f} ms"
        if ops and ops > total * 1.01:
            text += f"; its communication ops take {1e3 * ops:.1f} ms, so {100 * (1 - total / ops):.0f}% is " \
                    "hidden behind backward"
        out.append(text + ".")
    out += convergence(runs) + ps_analysis(runs) + scaling_analysis(runs)
    if any(r.kind == "ps" for r in runs):
        out.append("- Note: the PS uses its world size differently: rank 0 only serves, so it trains on "
                   "world_size - 1 processes and its global batch is num_workers x batch (see Trainers x "
                   "batch); per-step times and losses are therefore not for the same batch as DDP's.")
    for r in runs:
        if not r.complete:
            out.append(f"- {r.label}: status {r.data.get('status')!r} with {len(r.epochs)} epoch(s) recorded; "
                       "its numbers cover only those epochs.")
    return out


def convergence(runs):
    """Each run's loss curve against DDP's: with the same trainers and batch it is the same math."""
    out = []
    for r in runs:
        # A PS with N workers does DDP-with-N-processes' math (same shards, same global batch): prefer that DDP.
        twins = [d for d in runs if d.kind == "baseline_ddp" and d.world_size == r.trainers
                 and d.data["batch_size"] == r.data["batch_size"]]
        ref = twins[0] if r.kind == "ps" and twins else baseline_for(r, runs)
        if ref is None or ref is r:
            continue
        diffs = [abs(a["train_loss"] - b["train_loss"]) / abs(b["train_loss"])
                 for a, b in zip(r.epochs, ref.epochs) if b["train_loss"]]
        curve = curve_difference(r, ref)
        if not diffs or curve is None:
            continue
        worst = max(max(diffs), curve)
        _, ya = loss_curve(r)
        _, yb = loss_curve(ref)
        step_diff = float(np.max(np.abs(ya - yb))) if len(ya) == len(yb) and len(ya) else None
        same_batches = r.trainers == ref.trainers and r.data["batch_size"] == ref.data["batch_size"]
        verdict = ("match step by step (the same math)" if same_batches and step_diff is not None
                   and step_diff < 0.01 * float(np.mean(np.abs(yb)))
                   else "agree (within 2%)" if worst < 0.02 else "agree closely (within 5%)" if worst < 0.05
                   else "agree roughly (within 15%)" if worst < 0.15 else "DIFFER: check the method")
        text = (f"- Loss curves: {r.label} vs {ref.label}: per-epoch train loss differs by at most "
                f"{100 * max(diffs):.2f}%, the smoothed per-step curves by {100 * curve:.2f}% on average: they "
                f"{verdict}")
        if step_diff is not None:
            text += f"; step by step the losses differ by at most {step_diff:.2g}"
        if not same_batches:
            text += " (it trains on a different global batch and data split, so some difference is expected)"
        fa, fb = best_accuracy(r), best_accuracy(ref)
        if fa is not None and fb is not None:
            text += f"; best val accuracy {fa:.2f}% vs {fb:.2f}%"
        out.append(text + ".")
    return out


def ps_analysis(runs):
    """The single server's bottleneck, argued with the measured pull/push times."""
    out, ps_runs = [], [r for r in runs if r.kind == "ps" and comm_times(r).pull is not None]
    for r in ps_runs:
        c, n = comm_times(r), r.trainers
        text = (f"- PS bottleneck ({r.label}): every step the single server sends the parameters to and receives "
                f"a gradient from each of its {n} worker(s), so its link carries {2 * n} model copies per step "
                f"while an all-reduce rank moves 2(N-1)/N (under 2) whatever N; measured, workers wait "
                f"{1e3 * c.pull:.1f} ms to pull and {1e3 * c.push:.1f} ms to push per step")
        serve, update = r.metric("avg_server_pull_time"), r.metric("avg_server_update_time")
        if serve is not None:
            text += f"; the server spends {1e3 * serve:.1f} ms per step serving the pulls"
        if update is not None:
            text += f" and {1e3 * update:.1f} ms aggregating and updating" + (
                "" if "async" in r.variant else ", while every worker waits for the new parameters")
        peers = [a for a in runs if a.kind != "ps" and a.world_size == r.world_size and comm_times(a).total]
        if peers:
            best = min(peers, key=lambda a: comm_times(a).total)
            text += (f"; pull + push is {c.total / comm_times(best).total:.1f}x the "
                     f"{1e3 * comm_times(best).total:.1f} ms {best.label} waits on")
        out.append(text + ".")
    for (kind, variant), group in scaling_groups(ps_runs).items():
        a, b = group[0], group[-1]
        out.append(f"- PS ({variant}) pull+push went from {1e3 * comm_times(a).total:.1f} ms with "
                   f"{a.trainers} worker(s) to {1e3 * comm_times(b).total:.1f} ms with {b.trainers} "
                   f"({comm_times(b).total / comm_times(a).total:.2f}x for {b.trainers / a.trainers:.2f}x the workers).")
    for r in ps_runs:
        p2p = next((q for q in ps_runs if q.variant == "p2p" and q.world_size == r.world_size), None)
        if p2p and r is not p2p:
            out.append(f"- PS at {r.world_size} processes: {r.variant} communication is "
                       f"{comm_times(r).total / comm_times(p2p).total:.2f}x the guide's per-parameter p2p "
                       f"({1e3 * comm_times(r).total:.1f} vs {1e3 * comm_times(p2p).total:.1f} ms).")
    return out


def scaling_analysis(runs):
    out = []
    for (kind, variant), group in scaling_groups(runs).items():
        a, b = group[0], group[-1]
        ta, tb = a.metric("avg_train_throughput"), b.metric("avg_train_throughput")
        eff = tb / (ta * b.trainers / a.trainers)
        out.append(f"- Scaling {KINDS[kind][0]}{f' ({variant})' if variant else ''}: {ta:.1f} img/s at "
                   f"{a.world_size} processes -> {tb:.1f} at {b.world_size} ({100 * eff:.0f}% of linear).")
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
    runs, skipped = load_all(args.results_dir)
    if not runs:
        print(f"error: no usable results_*.json in {Path(args.results_dir).resolve()} "
              "(run the experiments first, e.g. bash run_all.sh)", file=sys.stderr)
        return 1
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    perf, comm = performance_table(runs), comm_table(runs)
    speedups = [f"  {row[0]}: {row[4]}" for row in perf[1]]
    tables = (f"Performance comparison\n{render_text(*perf)}\n\nCommunication per training step\n"
              f"{render_text(*comm)}\n{COMM_NOTE}\n\nSpeedup relative to Baseline DDP (same world size)\n"
              + "\n".join(speedups))
    print(tables)
    pngs = make_plots(runs, out / "plots")
    report = [f"Distributed training performance report ({time.strftime('%Y-%m-%d %H:%M:%S')})", "",
              "Run context", *context_lines(runs),
              "  files: " + ", ".join(r.path.name for r in runs), "",
              *([f"Skipped files: {'; '.join(skipped)}", ""] if skipped else []),
              tables, "", "Analysis (computed from the numbers above)", *analysis(runs), "",
              "Plots: " + ", ".join(f"plots/{p.name}" for p in pngs)]
    (out / "performance_report.txt").write_text("\n".join(report) + "\n")
    (out / "report_tables.md").write_text(
        f"### Performance\n\n{render_markdown(*perf)}\n\n### Communication per training step\n\n"
        f"{render_markdown(*comm)}\n\n{COMM_NOTE}\n")
    print(f"\nwrote {out / 'performance_report.txt'}, {out / 'report_tables.md'} and {len(pngs)} plots in {out / 'plots'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
