"""The plots: the guide's five (throughput, training time, loss curves, accuracy curves, communication
overhead) and the kit's time breakdown, scaling (against processes, and the cost against the emulated cluster's
nodes), bucket size, speed against accuracy, each rank's compute, and against training time: validation accuracy,
training loss and the time to the target accuracy (analysis.time_to_target). Colours are assigned here. Every plot function returns the numbers it drew ({experiment label: ...}), so a test can hold them
against the tables and the report."""
import textwrap

import matplotlib

matplotlib.use("Agg")  # headless: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from . import curves, ranks, verdicts  # noqa: E402
from . import time_to_target as ttt  # noqa: E402
from .links import cluster_name, cluster_points, link_figures  # noqa: E402
from .runs import KINDS, baseline_for, bucket_groups, cluster_groups, run_label, scaling_groups  # noqa: E402
from .stats import pct  # noqa: E402
from .tables import has_tradeoffs  # noqa: E402

CMAPS = {"baseline_ddp": "Blues", "all_reduce": "Oranges", "ps": "Greens"}  # one hue per method
PHASE_COLOURS = {"data loading": "#bbbbbb", "compute (no-communication step)": "#555555",
                 "communication overhead": "#d62728", "compute + communication (no yardstick to split them)": "#8c6d31"}
NESTED_LEGEND = dict(fontsize=8, title="curves that coincide nest (wider drawn first)", title_fontsize=8,
                     loc="upper left", bbox_to_anchor=(1.01, 1))


def colours(experiments):
    """{label: colour}: shades of one hue per method, one shade per variant."""
    out = {}
    for kind, cmap in CMAPS.items():
        variants = list(dict.fromkeys((x.variant, x.guide_format) for x in experiments if x.kind == kind))
        for x in experiments:
            if x.kind == kind:
                shade = variants.index((x.variant, x.guide_format)) / max(1, len(variants) - 1)
                out[x.label] = plt.get_cmap(cmap)(0.85 - 0.35 * shade)
    return out


def bar_axes(experiments, colour, extra_height=1.2):
    fig, ax = plt.subplots(figsize=(10, extra_height + 0.55 * len(experiments)))
    y = np.arange(len(experiments))[::-1]
    ax.set_yticks(y, [x.label for x in experiments])
    ax.set_ylim(-0.6, len(experiments) - 0.4)  # every row, even one with nothing drawn
    for tick, x in zip(ax.get_yticklabels(), experiments):
        tick.set_color(colour[x.label])
    return fig, ax, y


def save(fig, ax, path, xlabel, ylabel, title, legend=None, note=None):
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    rows = -(-len(ax.get_legend_handles_labels()[0]) // legend.get("ncol", 1)) if legend else 0
    ax.set_title(title, pad=8 + 16 * rows if legend and legend.get("loc") == "lower center" else 6)
    ax.grid(axis="x" if ylabel is None else "both", alpha=0.3)
    if legend:
        ax.legend(**legend)
    if note:  # under the x label; the saved area grows to hold it
        fig.text(0.01, -0.02, note, fontsize=8, style="italic", va="top")
    fig.savefig(path, dpi=100, bbox_inches="tight")  # "tight": the area holds every label, no layout pass needed
    plt.close(fig)


def bars(experiments, colour, figure, path, xlabel, title, text, scale=1.0):
    """A horizontal bar per experiment (mean over seeds, whiskers ± sd); incomplete ones hatched. Returns
    {label: drawn value}."""
    fig, ax, y = bar_axes(experiments, colour)
    drawn = {x.label: x.stat(figure) for x in experiments}
    top = max([e.mean * scale for e in drawn.values() if e] + [1e-9])
    for yi, x in zip(y, experiments):
        est = drawn[x.label]
        if est is None:
            ax.text(0, yi, " not measured", va="center", fontsize=9)
            continue
        ax.barh(yi, est.mean * scale, color=colour[x.label], edgecolor="black", linewidth=0.6,
                hatch=None if x.complete else "//", xerr=None if est.sd is None else est.sd * scale, capsize=4)
        ax.text(est.mean * scale + top * 0.01, yi, " " + text(est.mean * scale, x), va="center", fontsize=9)
    ax.set_xlim(0, top * 1.45)
    save(fig, ax, path, xlabel, None, title)
    return {label: None if est is None else est.mean * scale for label, est in drawn.items()}


def widths(n):
    return np.linspace(5, 1.5, n) if n > 1 else [2]


def plot_loss(experiments, colour, path):
    """Smoothed loss per experiment; a band (min-max over seeds) where there are several, and the title says
    "band" only when one is drawn. Returns {"title", "note", "curves": {label: {"band": drawn, "steps": n}}}."""
    fig, ax = plt.subplots(figsize=(11, 5.5))
    drawn, missing = {}, []
    modeled = [x.label for x in experiments if x.modeled]
    for x, width in zip(experiments, widths(len(experiments))):
        if x.modeled:  # a proxy model's loss: meaningless
            continue
        if any(r.losses is None for r in x.runs):
            missing.append(x.label)
            continue
        grid = curves.common_grid(x)
        style = dict(color=colour[x.label], linestyle="-" if x.complete else "--")
        if grid is None or len(x.runs) == 1:
            ax.plot(*curves.loss_curve(x.first), color=colour[x.label], alpha=0.2, linewidth=0.8)
            ax.plot(*curves.smoothed(x.first), linewidth=width, label=x.label, **style)
            drawn[x.label] = {"band": False, "steps": len(x.first.losses[1])}
            continue
        c = curves.curves_on(grid, x)
        ax.fill_between(grid, c.min(0), c.max(0), color=colour[x.label], alpha=0.2)
        ax.plot(grid, c.mean(0), linewidth=width, label=x.label, **style)
        drawn[x.label] = {"band": True, "steps": len(x.first.losses[1])}
    band = "; band: min-max over seeds" if any(d["band"] for d in drawn.values()) else ""
    raw = "; faint: raw" if any(not d["band"] for d in drawn.values()) else ""
    title = f"Training loss per step (moving average over ~1/4 epoch{band}{raw})"
    notes = ([f"no per-step losses in: {', '.join(missing)}"] if missing else []) + (
        [f"left out, modeled compute (a proxy's loss means nothing): {', '.join(modeled)}"] if modeled else [])
    note = "; ".join(notes) or None
    save(fig, ax, path, "epoch", "training loss (cross-entropy)", title, NESTED_LEGEND if drawn else None, note=note)
    return {"title": title, "note": note, "curves": drawn}


def plot_accuracy(experiments, colour, path):
    """Training and validation accuracy per epoch (mean over seeds); --synthetic runs are left out (their
    accuracy means nothing) and the plot says so. Returns {"train": {label: [(epoch, %)]}, "val": ...,
    "left_out": [labels], "note"}."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    shown = [x for x in experiments if not x.accuracy_void]
    drawn = {"train": {}, "val": {}, "left_out": [x.label for x in experiments if x.accuracy_void]}
    for ax, key, name, title in zip(axes, ("train_accuracy", "val_accuracy"), ("train", "val"),
                                    ("Training accuracy", "Validation accuracy")):
        for i, (x, width) in enumerate(zip(shown, widths(len(shown)))):
            epochs = sorted({e["epoch"] for r in x.runs for e in r.epochs if isinstance(e.get(key), (int, float))})
            means = [float(np.mean([e[key] for r in x.runs for e in r.epochs if e["epoch"] == n
                                    and isinstance(e.get(key), (int, float))])) for n in epochs]
            if epochs:
                ax.plot(epochs, means, marker="osD^vPX"[i % 7], markersize=2.5 * width + 2, linewidth=width,
                        color=colour[x.label], label=x.label, linestyle="-" if x.complete else "--")
                drawn[name][x.label] = list(zip(epochs, means))
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%, mean over seeds)")
    notes = []
    synthetic = [x.label for x in experiments if x.accuracy_void == "synthetic"]
    modeled = [x.label for x in experiments if x.accuracy_void == "modeled compute"]
    if synthetic:
        notes.append(f"left out, --synthetic (random images: accuracy means nothing): {', '.join(synthetic)}")
    if modeled:
        notes.append(f"left out, modeled compute (a proxy's accuracy means nothing): {', '.join(modeled)}")
    no_val = [x.label for x in shown if x.label not in drawn["val"]]
    if no_val:
        notes.append(f"no validation accuracy in: {', '.join(no_val)}")
    if not shown:
        for ax in axes:
            ax.text(0.5, 0.5, "no run with meaningful accuracy", ha="center", va="center", transform=ax.transAxes)
    handles = axes[0].get_legend_handles_labels()[0]  # every experiment shown (the right may lack some)
    drawn["note"] = "; ".join(notes) or None
    save(fig, axes[1], path, "epoch", None, "Validation accuracy", dict(NESTED_LEGEND, handles=handles)
         if handles else None, note=drawn["note"])
    return drawn


# --------------------------------------------------------------------------- against time
TIME_AXIS = "training time (s, cumulative; validation excluded)"


def epoch_ends(run):
    """[0, end of epoch 1, end of epoch 2, ...] in cumulative training seconds."""
    return np.concatenate([[0.0], np.cumsum([float(e["train_time"]) for e in run.epochs])])


def loss_on_time(run):
    """(training seconds, smoothed per-step loss) of a run: each epoch's steps spread evenly over its train_time."""
    x, y = curves.smoothed(run)
    return np.interp(x, np.arange(len(run.epochs) + 1), epoch_ends(run)), y


def plot_accuracy_time(experiments, colour, path):
    """Validation accuracy against cumulative training time, every compared experiment on one chart (mean over
    seeds of each epoch's time and accuracy; faint: each seed), the first target dotted. Returns {"curves": {label:
    [(seconds, %)]}, "target", "note"}."""
    fig, ax = plt.subplots(figsize=(11, 5.5))
    compared, void, unmeasured = ttt.split(experiments)
    goals = ttt.choose_targets(experiments)
    drawn = {"curves": {}, "target": goals[0] if goals else None}
    for i, (x, width) in enumerate(zip(compared, widths(len(compared)))):
        per_seed = [ttt.val_curve(r) for r in x.runs]
        if len(per_seed) > 1:
            for c in per_seed:
                ax.plot([p[1] for p in c], [p[3] for p in c], color=colour[x.label], alpha=0.25, linewidth=0.8)
        epochs = sorted({p[0] for c in per_seed for p in c})
        points = [(float(np.mean([p[1] for c in per_seed for p in c if p[0] == n])),
                   float(np.mean([p[3] for c in per_seed for p in c if p[0] == n]))) for n in epochs]
        ax.plot(*zip(*points), marker="osD^vPX"[i % 7], markersize=2.5 * width + 2, linewidth=width,
                color=colour[x.label], label=x.label, linestyle="-" if x.complete else "--")
        drawn["curves"][x.label] = points
    if goals:
        ax.axhline(goals[0], color="black", linestyle=":", linewidth=1, label=f"target {goals[0]:g}%")
    notes = ([f"left out, accuracy means nothing: {', '.join(x.label for x in void)}"] if void else []) + (
        [f"no validation accuracy in: {', '.join(x.label for x in unmeasured)}"] if unmeasured else [])
    drawn["note"] = "; ".join(notes) or None
    if not compared:
        ax.text(0.5, 0.5, "no run with meaningful validation accuracy", ha="center", va="center",
                transform=ax.transAxes)
    save(fig, ax, path, TIME_AXIS, "validation accuracy (%)", "Validation accuracy against training time (one point "
         "per epoch; faint: each seed)", NESTED_LEGEND if compared else None, note=drawn["note"])
    return drawn


def plot_loss_time(experiments, colour, path):
    """Training loss (smoothed, as loss_curves.png) against cumulative training time, every experiment with
    per-step losses on one chart; the mean over seeds with a min-max band where there are several. Modeled compute
    is left out (a proxy's loss). Returns {"curves": {label: {"band", "end"}}, "note"}."""
    fig, ax = plt.subplots(figsize=(11, 5.5))
    drawn, missing = {}, []
    modeled = [x.label for x in experiments if x.modeled]
    for x, width in zip(experiments, widths(len(experiments))):
        if x.modeled:
            continue
        if any(r.losses is None for r in x.runs):
            missing.append(x.label)
            continue
        style = dict(color=colour[x.label], linestyle="-" if x.complete else "--", linewidth=width, label=x.label)
        lines = [loss_on_time(r) for r in x.runs]
        lo, hi = max(t[0] for t, _ in lines), min(t[-1] for t, _ in lines)
        if len(lines) > 1 and hi > lo:
            grid = np.linspace(lo, hi, 200)
            c = np.array([np.interp(grid, t, y) for t, y in lines])
            ax.fill_between(grid, c.min(0), c.max(0), color=colour[x.label], alpha=0.2)
            ax.plot(grid, c.mean(0), **style)
            drawn[x.label] = {"band": True, "end": float(hi)}
        else:
            ax.plot(*lines[0], **style)
            drawn[x.label] = {"band": False, "end": float(lines[0][0][-1])}
    notes = ([f"no per-step losses in: {', '.join(missing)}"] if missing else []) + (
        [f"left out, modeled compute (a proxy's loss means nothing): {', '.join(modeled)}"] if modeled else [])
    note = "; ".join(notes) or None
    band = "; band: min-max over seeds" if any(d["band"] for d in drawn.values()) else ""
    save(fig, ax, path, TIME_AXIS, "training loss (cross-entropy)",
         f"Training loss against training time (moving average over ~1/4 epoch{band})",
         NESTED_LEGEND if drawn else None, note=note)
    return {"curves": drawn, "note": note}


def plot_time_to_target(experiments, colour, path):
    """A bar per experiment: the training seconds to the first target (mean over seeds, whiskers ± sd); "never",
    "n/a" or "not measured" written where there is none. Returns {"target", "bars": {label: seconds or None}}."""
    fig, ax, y = bar_axes(experiments, colour)
    goal = ttt.choose_targets(experiments)[0]
    compared = ttt.split(experiments)[0]
    drawn = {"target": goal, "bars": {}}
    reaches = {x.label: ttt.reach(x, goal) for x in compared}
    top = max([g.seconds.mean for g in reaches.values() if g.seconds] + [1e-9])
    for yi, x in zip(y, experiments):
        g = reaches.get(x.label)
        if g is None or g.seconds is None:
            why = f"n/a ({x.accuracy_void})" if x.accuracy_void else "no validation accuracy" if g is None else \
                "never reached"
            ax.text(0, yi, " " + why, va="center", fontsize=9)
            drawn["bars"][x.label] = None
            continue
        est = g.seconds
        ax.barh(yi, est.mean, color=colour[x.label], edgecolor="black", linewidth=0.6,
                hatch=None if x.complete else "//", xerr=est.sd, capsize=4)
        extra = f"; {len(g.missed)} seed(s) never" if g.missed else ""
        ax.text(est.mean + (est.sd or 0) + top * 0.01, yi, f" {g.text(1)} s (epoch {g.epochs.mean:.0f}{extra})",
                va="center", fontsize=9)
        drawn["bars"][x.label] = est.mean
    ax.set_xlim(0, top * 1.5)
    save(fig, ax, path, f"training seconds until the validation accuracy first reached {goal:g}% (validation "
         "excluded; to the end of that epoch)", None,
         f"Time to {goal:g}% validation accuracy (lower is better; whiskers: ± sd over seeds)")
    return drawn


def plot_comm(experiments, colour, path):
    """The yardstick for every method that has it (whiskers: min-max over the pairs; black tick: the measured
    bytes at the link rate); a run without it shows its script's own communication timer, hatched and labelled so.
    Returns {label: {"overhead", "lo", "hi", "link_time"} or {"own_timer"} or {}} in seconds."""
    fig, ax, y = bar_axes(experiments, colour, 1.6)
    ends, drawn, own_drawn = [], {}, False
    for yi, x in zip(y, experiments):
        overhead, link = x.mean("yardstick.overhead"), link_figures(x)
        style = dict(color=colour[x.label], edgecolor="black", linewidth=0.6, hatch=None if x.complete else "//")
        if overhead is None:
            own = x.mean("comm_total")
            if own is None:
                ax.text(0, yi, " not measured" + (" (a guide-format file: only the kit's scripts measure it)"
                                                  if x.guide_format else " (--overhead-pairs 0)"),
                        va="center", fontsize=9)
                ends.append(0)
                drawn[x.label] = {}
                continue
            ax.barh(yi, 1e3 * own, color="white", edgecolor=colour[x.label], hatch="xx", linewidth=1.2)
            ax.text(1e3 * own * 1.02, yi, f" {1e3 * own:.1f} ms: the script's own timer, not the yardstick",
                    va="center", fontsize=9)
            ends.append(1e3 * own)
            drawn[x.label], own_drawn = {"own_timer": own}, True
            continue
        lo, hi = verdicts.overhead_range(x)
        ax.barh(yi, 1e3 * overhead, xerr=[[1e3 * (overhead - lo)], [1e3 * (hi - overhead)]], capsize=4, **style)
        text = f"{1e3 * overhead:.1f} ms ({1e3 * lo:.1f} to {1e3 * hi:.1f})"
        if link:
            ax.plot([1e3 * link.link_time] * 2, [yi - 0.4, yi + 0.4], color="black", linewidth=2)
            text += f"; measured bytes at link rate {1e3 * link.link_time:.1f} ms (black tick)"
        ends.append(1e3 * max(hi, link.link_time if link else 0))
        ax.text(ends[-1] * 1.02, yi, " " + text, va="center", fontsize=9)
        drawn[x.label] = {"overhead": overhead, "lo": lo, "hi": hi, "link_time": link.link_time if link else None}
    lows = [1e3 * d["lo"] for d in drawn.values() if "lo" in d]
    ax.set_xlim(min([0] + lows), max(ends + [1e-3]) * 1.7)
    save(fig, ax, path, "communication per training step (ms): the yardstick = step minus the same step without "
         "communication", None, "Communication overhead, one yardstick for every method (PS vs All-Reduce vs DDP)",
         note="hatched white bars: a script's own communication timer (e.g. the guide's avg_comm_time), not "
              "comparable with the yardstick" if own_drawn else None)
    return drawn


def breakdown(x):
    """Seconds per step of the measured training step (avg_batch_time): the data wait as measured, the rest split
    into compute and communication overhead by the yardstick's share (overhead / its step on the fixed batch),
    so the bar's overhead is the same share of the step without data as the report's."""
    step, data = x.mean("batch_time"), x.mean("data_time")
    share = x.mean("yardstick.share")
    rest = step - (data or 0.0)
    parts = {"data loading": data or 0.0}
    if share is None:
        parts["compute + communication (no yardstick to split them)"] = rest
    else:
        overhead = max(0.0, share) * rest
        parts.update({"compute (no-communication step)": rest - overhead, "communication overhead": overhead})
    return {"step": step, "data": data, "share": share, "parts": parts}


def plot_breakdown(experiments, colour, path):
    """One bar per experiment totalling its measured training step. Returns {label: breakdown(x) + "text"}."""
    fig, ax, y = bar_axes(experiments, colour, 1.8)
    drawn = {x.label: breakdown(x) for x in experiments}
    left, shown = np.zeros(len(experiments)), 0
    for name, c in PHASE_COLOURS.items():
        w = np.array([1e3 * drawn[x.label]["parts"].get(name, 0.0) for x in experiments])
        if w.any():
            ax.barh(y, w, left=left, color=c, edgecolor="white", label=name)
            shown += 1
        left += w
    for yi, x, total in zip(y, experiments, left):
        d = drawn[x.label]
        if d["share"] is None:
            share = "overhead not measured"
        elif verdicts.overhead_near_zero(x):
            share = "overhead within noise of 0"
        else:
            share = f"overhead {pct(d['share'])} of the step without data"
        d["text"] = f"{1e3 * d['step']:.0f} ms/step measured; {share}" + (
            "" if d["data"] is not None else "; data wait not measured")
        ax.text(total * 1.01, yi, " " + d["text"], va="center", fontsize=9)
    ax.set_xlim(0, max(left) * 1.6 if max(left) > 0 else 1)
    save(fig, ax, path, "time per training step (ms): the bar is the epochs' measured step (avg_batch_time); data = "
         "its measured wait;\nthe rest is split by the yardstick's overhead share (measured on a fixed batch before "
         "epoch 1), scaled to the measured step", None, "Where a training step goes",
         dict(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(shown, 2 if shown > 3 else 3), fontsize=9,
              frameon=False))
    return drawn


def plot_scaling(experiments, colour, path):
    fig, ax = plt.subplots(figsize=(9, 5.5))
    sizes, drawn = set(), {}
    for (kind, variant, model), group in scaling_groups(experiments).items():
        ws, thr = [x.world_size for x in group], [x.mean("throughput") for x in group]
        name = KINDS[kind][0] + f" ({variant or 'guide file'}{', modeled compute' if model else ''})"
        ideal = [thr[0] * x.trainers / group[0].trainers for x in group]
        ax.plot(ws, thr, marker="o", color=colour[group[0].label], linewidth=2, label=name)
        ax.plot(ws, ideal, linestyle=":", color=colour[group[0].label], label=f"{name}: linear in trainers")
        for x, t, i in list(zip(group, thr, ideal))[1:]:
            ax.annotate(f"{t:.0f} ({100 * t / i:.0f}%)", (x.world_size, t), textcoords="offset points",
                        xytext=(6, -4), fontsize=8)
        sizes.update(ws)
        drawn[name] = list(zip(ws, thr))
    ax.set_xticks(sorted(sizes))
    save(fig, ax, path, "processes (world size; a single PS trains on all but one)", "training throughput (img/s)",
         "Scaling: throughput vs processes (labels: img/s and % of linear from the smallest run)", dict(fontsize=8))
    return drawn


def plot_cluster(experiments, colour, path):
    """Communication per step (the yardstick's overhead) against the emulated cluster's nodes, per method and
    variant, beside the link-rate time of the bytes its pattern must move (dotted); each point annotated with the
    measured bytes per step through the busiest node link. Returns {name: cluster_points(group)}."""
    fig, ax = plt.subplots(figsize=(10, 5.8))
    drawn, ticks = {}, set()
    for key, group in cluster_groups(experiments).items():
        name, c, points = cluster_name(key), colour[group[0].label], cluster_points(group)
        measured = [(p["nodes"], 1e3 * p["overhead"], p["bytes"]) for p in points if p["overhead"] is not None]
        if measured:
            ax.plot([m[0] for m in measured], [m[1] for m in measured], marker="o", linewidth=2, color=c,
                    label=f"{name}: measured overhead")
            for n, y, b in measured:
                if b is not None:
                    ax.annotate(f"{b / 1e6:.1f} MB/link", (n, y), textcoords="offset points", xytext=(5, 5),
                                fontsize=8, color=c)
        bound = [(p["nodes"], 1e3 * p["bound"]) for p in points if p["bound"] is not None]
        if bound:
            ax.plot([b[0] for b in bound], [b[1] for b in bound], linestyle=":", linewidth=2, color=c,
                    label=f"{name}: link-rate bound ({points[-1]['how']})")
        ticks.update(p["nodes"] for p in points)
        drawn[name] = points
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
    if ticks:
        ax.set_xlim(min(ticks) / 1.25, max(ticks) * 1.5)  # room for the last point's label
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    save(fig, ax, path, "nodes of the emulated cluster (log scale)", "communication per training step (ms)",
         "Cost against the number of nodes: the yardstick's overhead beside its link-rate bound",
         dict(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1)),
         note="labels: measured bytes per step through the busiest node link (per direction); dotted: the bytes "
              "the method's pattern must move there, at the link rate")
    return drawn


def plot_rank_compute(experiments, colour, path):
    """Each run's per-rank compute per step (forward + backward, mean over its epochs; whiskers: the mean
    step-to-step stdev), its median as a dashed line across the group, a straggler red and labelled with its
    ratio. Returns {run label: {"ranks", "compute", "stdev", "median", "stragglers": {rank: ratio}}}, seconds."""
    rows = [(run_label(x, r), x, r.rank_compute) for x in experiments for r in x.runs if r.rank_compute]
    fig, ax = plt.subplots(figsize=(min(18, max(8, 2 + 0.6 * sum(len(rc.ranks) + 1 for *_, rc in rows))), 5.5))
    drawn, pos, ticks, names = {}, 0, [], []
    for label, x, rc in rows:
        slow = {s.rank: s for s in rc.stragglers}
        at = pos + np.arange(len(rc.ranks))
        err = [1e3 * (sd or 0.0) for sd in rc.stdev]
        ax.bar(at, [1e3 * c for c in rc.compute], yerr=err, capsize=3, edgecolor="black", linewidth=0.6,
               color=["#d62728" if k in slow else colour[x.label] for k in rc.ranks])
        ax.hlines(1e3 * rc.median, at[0] - 0.45, at[-1] + 0.45, color="black", linestyle="--", linewidth=1)
        for a, k, c, e in zip(at, rc.ranks, rc.compute, err):
            if k in slow:
                ax.annotate(f"{slow[k].ratio:.2f}x\n({ranks.epochs_text(slow[k].epochs)})", (a, 1e3 * c + e),
                            textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8, color="#d62728")
        # the ranks' ticks, and the run's name under them on a tick of its own at the group's middle
        ticks += [*at, at.mean()]
        names += [str(k) for k in rc.ranks] + ["\n" + textwrap.fill(label, 24)]
        drawn[label] = {"ranks": list(rc.ranks), "compute": list(rc.compute), "stdev": list(rc.stdev),
                        "median": rc.median, "stragglers": {k: s.ratio for k, s in slow.items()}}
        pos += len(rc.ranks) + 1
    ax.set_xticks(ticks, names, fontsize=8)
    ax.tick_params(axis="x", length=0)
    ax.margins(y=0.15)
    save(fig, ax, path, "rank, grouped by run", "own compute per step (ms): forward + backward",
         "Each rank's own compute per step (dashed: the median; red: the straggler the run named,\n"
         "x the others' median, over the epochs it was named in)",
         note="bars: mean over the epochs that record it; whiskers: the step-to-step standard deviation")
    return drawn


def plot_buckets(experiments, colour, path):
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8))
    fig.subplots_adjust(wspace=0.3)
    drawn = {}
    for (name, ws), group in bucket_groups(experiments).items():
        sizes = [s for s, _ in group]
        c = colour[group[0][1].label]
        a.plot(sizes, [x.mean("throughput") for _, x in group], marker="o", color=c, label=f"{name} ({ws} proc)")
        b.plot(sizes, [1e3 * (x.mean("yardstick.overhead") or float("nan")) for _, x in group], marker="o",
               color=c, label=f"{name} ({ws} proc)")
        drawn[f"{name} ({ws} proc)"] = [(s, x.mean("throughput")) for s, x in group]
    for ax, ylabel in ((a, "throughput (img/s)"), (b, "communication overhead (ms/step)")):
        ax.set_xscale("log")
        ax.set_xlabel("bucket size (MiB, log scale)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, b, path, "bucket size (MiB, log scale)", "communication overhead (ms/step)",
         "Bucket size: throughput (left) and communication overhead (right)")
    return drawn


def plot_tradeoff(experiments, colour, path):
    fig, ax = plt.subplots(figsize=(9, 5.5))
    synthetic = all(x.synthetic for x in experiments)  # then the loss stands in for the accuracy
    drawn, left_out = {}, [x.label for x in experiments if x.modeled or (x.synthetic and not synthetic)]
    for x in experiments:
        yv = x.mean("final_train_loss") if synthetic else x.mean("final_val_accuracy")
        if yv is None or x.label in left_out:
            continue
        ax.scatter([x.mean("throughput")], [yv], color=colour[x.label], s=80, edgecolor="black", label=x.label)
        drawn[x.label] = (x.mean("throughput"), yv)
    save(fig, ax, path, "throughput (img/s)", "final training loss" if synthetic else "final val accuracy (%)",
         "Speed against accuracy (compression, async PS and their baselines)", dict(fontsize=8) if drawn else None,
         note=f"left out, --synthetic or modeled compute (accuracy means nothing): {', '.join(left_out)}"
         if left_out else None)
    return drawn


def make_plots(experiments, folder):
    """Writes every plot into the folder; returns {file name: what it drew}."""
    folder.mkdir(parents=True, exist_ok=True)
    colour = colours(experiments)

    def vs_ddp(value, x):
        base = baseline_for(x, experiments)
        return f"{value:.1f} img/s" + (f" ({value / base.mean('throughput'):.2f}x DDP)" if base else "")

    drawn = {
        "throughput_comparison.png": bars(
            experiments, colour, "throughput", folder / "throughput_comparison.png",
            "average training throughput (img/s)",
            "Throughput (higher is better; whiskers: ± sd over seeds; hatched: incomplete run)", vs_ddp),
        "training_time_comparison.png": bars(
            experiments, colour, "time_per_epoch", folder / "training_time_comparison.png",
            "average training time per epoch (s)", "Training time per epoch (lower is better)",
            lambda v, x: f"{v:.2f} s"),
        "loss_curves.png": plot_loss(experiments, colour, folder / "loss_curves.png"),
        "accuracy_curves.png": plot_accuracy(experiments, colour, folder / "accuracy_curves.png"),
        "communication_overhead.png": plot_comm(experiments, colour, folder / "communication_overhead.png"),
        "time_breakdown.png": plot_breakdown(experiments, colour, folder / "time_breakdown.png"),
    }
    if ttt.choose_targets(experiments):
        drawn["accuracy_vs_time.png"] = plot_accuracy_time(experiments, colour, folder / "accuracy_vs_time.png")
        drawn["time_to_accuracy.png"] = plot_time_to_target(experiments, colour, folder / "time_to_accuracy.png")
    if any(not x.modeled and all(r.losses is not None for r in x.runs) for x in experiments):
        drawn["loss_vs_time.png"] = plot_loss_time(experiments, colour, folder / "loss_vs_time.png")
    if scaling_groups(experiments):
        drawn["scaling.png"] = plot_scaling(experiments, colour, folder / "scaling.png")
    if cluster_groups(experiments):
        drawn["scaling_cluster.png"] = plot_cluster(experiments, colour, folder / "scaling_cluster.png")
    if any(r.rank_compute for x in experiments for r in x.runs):
        drawn["rank_compute.png"] = plot_rank_compute(experiments, colour, folder / "rank_compute.png")
    if bucket_groups(experiments):
        drawn["bucket_size.png"] = plot_buckets(experiments, colour, folder / "bucket_size.png")
    if has_tradeoffs(experiments):
        drawn["speed_vs_accuracy.png"] = plot_tradeoff(experiments, colour, folder / "speed_vs_accuracy.png")
    return drawn
