"""The tables: each a Table (title, columns, rows of named cells, a one-line caption, the group it is shown in, a
note), built from a dict of column header -> the cell of one experiment, so a new column is one line; rendered as
text within 120 columns for the terminal and the report (the caption above; the note's definitions are in
docs/reading_the_report.md), and as markdown for report_tables.md (wide, with the note). A figure a run does not
record is "-"."""
import dataclasses
import textwrap

from . import ranks, recovery, verdicts
from . import time_to_target as ttt
from .links import link_figures, physical_limit
from .runs import baseline_for, run_label, twin_ddp
from .stats import number

WIDTH = 120  # the text report's and the terminal's columns
FIRST_COLUMN_MAX = 56  # a longer row label wraps onto a second line


@dataclasses.dataclass
class Table:
    title: str
    columns: list
    rows: list  # one dict per row: column header -> cell text
    note: str = ""  # the definitions, in full: report_tables.md and docs/reading_the_report.md
    caption: str = ""  # one line under the title in the text report
    group: str = ""  # the Details group it is shown in

    def column(self, header):
        """{row label (the first column): cell} of one column."""
        return {row[self.columns[0]]: row[header] for row in self.rows}


def make_table(title, experiments, cells, note=""):
    """A Table with one row per experiment: cells is {header: function(experiment) -> cell text}."""
    return Table(title, list(cells), [{h: get(x) for h, get in cells.items()} for x in experiments], note)


def cell(x, figure, digits=2, scale=1.0):
    """The experiment's figure over its seeds ("mean ± sd"), or "-" when its runs do not record it."""
    est = x.stat(figure)
    return "-" if est is None else est.text(digits, scale)


# --------------------------------------------------------------------------- the tables
def speedup(x, experiments):
    """Throughput against the DDP run of the same world size (or, for a PS without one, DDP on as many
    trainers)."""
    base, twin = baseline_for(x, experiments), twin_ddp(x, experiments)
    if base is x:
        return "1.00x (baseline)"
    if base is None and twin is None and x.modeled and any(d.kind == "baseline_ddp" for d in experiments):
        return "n/a (no DDP of its compute model)"  # never against a real run's throughput
    if base is not None:
        return f"{x.mean('throughput') / base.mean('throughput'):.2f}x"
    if twin is not None:  # e.g. a PS on N+1 processes against DDP on its N trainers
        return f"{x.mean('throughput') / twin.mean('throughput'):.2f}x (vs DDP on {twin.world_size})"
    return "n/a (no DDP run)"


def accuracy_cell(x, figure):
    """An accuracy figure, or "n/a (synthetic)" / "n/a (modeled compute)" where it means nothing."""
    return f"n/a ({x.accuracy_void})" if x.accuracy_void else cell(x, figure)


def seeds_cell(x):
    """How many seeds, then which: "1: 0", "3: 0, 1, 2"; "1: -" when a file records none."""
    return f"{len(x.runs)}: " + ", ".join("-" if s is None else str(s) for s in x.seeds)


def performance_table(xs):
    return make_table("Performance comparison", xs, {
        "Method": lambda x: x.label,
        "Avg throughput (img/s)": lambda x: cell(x, "throughput", 1),
        "Avg train time/epoch (s)": lambda x: cell(x, "time_per_epoch"),
        "Best accuracy (%)": lambda x: accuracy_cell(x, "best_val_accuracy"),
        "Relative speedup": lambda x: speedup(x, xs),
        "Trainers x batch": lambda x: f"{x.trainers} x {x.batch_size}" + (
            " (+1 server)" if x.trainers < x.world_size else ""),
        "Seeds (n: values)": seeds_cell,
    }, "Speedup: throughput against the Baseline DDP run of the same world size (a PS without one: against DDP on "
       "as many trainers); whether a difference is beyond noise is judged in the analysis below. ± is the spread "
       "(standard deviation) over seeds.")


YARDSTICK_NOTE = (
    "Comm overhead: the method's training step minus the same step with no communication at all, measured the same "
    "way for every method in pairs before epoch 1 (median; min-max over the pairs beside it); share = overhead / "
    "step; scaling efficiency = throughput / (trainers x the no-communication throughput of one); hidden = 1 - "
    "overhead / the same buckets synchronized blocking after backward, both measured in the run, shown only when "
    "the two differ beyond the pairs' spread. Physical limit: a step cannot be shorter than the larger of its "
    "compute (the step without communication) and its measured bytes per step through the busiest node link at "
    "the link rate (loopback, no declared link: the compute alone); limit / step = how close the yardstick's own "
    "step with communication (the same fixed batch) came to it, 1.00 = at the limit; \"at it, in noise\": within "
    "the pairs' spread of the limit; above 1 beyond that spread would be a measurement problem. Only the kit's "
    "scripts measure it: a guide-format file (or a run with --overhead-pairs 0, or resumed) shows -.")


def limit_cells(x):
    """The physical limit's two cells: "3591.2 (link)" and "0.91", or dashes."""
    lim = physical_limit(x)
    if lim is None:
        return "-", "-"
    return f"{1e3 * lim.limit:.1f} ({lim.bound_by})", lim.reached_text


def share_cell(x):
    """The overhead's share of the step; "~0 (in noise)" when the overhead is within noise of zero (a negative
    share would read as nonsense)."""
    if x.stat("yardstick.share") is None:
        return "-"
    return "~0 (in noise)" if verdicts.overhead_near_zero(x) else cell(x, "yardstick.share", 1, 100)


def yardstick_table(xs):
    def spread(x):
        r = verdicts.overhead_range(x)
        return "-" if r is None else f"{1e3 * r[0]:.1f} to {1e3 * r[1]:.1f}"

    def hidden(x):
        h = verdicts.hidden(x) if x.stat("yardstick.overhead") else None
        return "-" if h is None else h.cell

    return make_table("Communication per training step", xs, {
        "Method": lambda x: x.label,
        "Comm overhead (ms/step)": lambda x: cell(x, "yardstick.overhead", 1, 1e3),
        "Spread min-max (ms)": spread,
        "Share of step (%)": share_cell,
        "Scaling efficiency (%)": lambda x: cell(x, "scaling_efficiency", 1, 100),
        "Hidden behind backward (%)": hidden,
        "Physical limit (ms/step)": lambda x: limit_cells(x)[0],
        "Limit / step (fixed batch)": lambda x: limit_cells(x)[1],
    }, YARDSTICK_NOTE)


OWN_TIMERS_NOTE = (
    "Each script's own timers (the guide's avg_comm_time, avg_comm_time_pull, avg_comm_time_push): the PS workers' "
    "pull and push waits (means over workers), the all-reduce's wait after backward, the single server's update. "
    "They time different things in each method and are not the yardstick above; DDP's all-reduce runs inside "
    "backward and has no wait of its own to time.")


def own_timers_table(xs):
    return make_table("Communication as each script timed it", xs, {
        "Method": lambda x: x.label,
        "Param pull (ms)": lambda x: cell(x, "comm_pull", 1, 1e3),
        "Grad push (ms)": lambda x: cell(x, "comm_push", 1, 1e3),
        "All-Reduce wait (ms)": lambda x: cell(x, "comm_wait", 1, 1e3),
        "Total comm (ms)": lambda x: "(implicit, inside backward)" if x.kind == "baseline_ddp" else
        cell(x, "comm_total", 1, 1e3),
        "Server update (ms)": lambda x: cell(x, "server_update", 1, 1e3),
    }, OWN_TIMERS_NOTE)


def several_per_node(x):
    return ((x.network or {}).get("procs_per_node") or 1) > 1


def pattern_cells(x, f):
    """The all-reduce pattern columns of a link-table row: the pattern the row used, and a flat ring's and the
    two-level's bytes per node link (MB), the one it used marked; "-" for a PS."""
    if f.pattern is None or f.ring_bytes is None:
        return "-", "-"
    ring, two = f"{f.ring_bytes / 1e6:.1f}", f"{f.two_level_bytes / 1e6:.1f}"
    if f.pattern == "flat ring":
        ring = f"[{ring}]"
    elif f.pattern == "two-level":
        two = f"[{two}]"
    return f.pattern, f"{ring} / {two}"


def link_table(xs):
    figures = {x.label: link_figures(x) for x in xs}
    f = lambda x: figures[x.label]  # noqa: E731
    overhead = lambda x: x.mean("yardstick.overhead")  # noqa: E731
    patterns = {}
    if any(f(x) and f(x).pattern and several_per_node(x) for x in xs):
        patterns = {
            "All-reduce pattern": lambda x: pattern_cells(x, f(x))[0],
            "Flat ring / two-level per node link (MB)": lambda x: pattern_cells(x, f(x))[1],
        }
    note = (" All-reduce pattern (on several processes per node): a flat ring over the N processes moves 2(N-1)/N x "
            "the gradients through each node link, the two-level all-reduce (--sync hierarchical) 2(M-1)/M on M "
            "nodes; [brackets]: the pattern the row used (DDP on gloo and the manual all-reduce's other modes: the "
            "flat ring; DDP on nccl: NCCL's choice, neither marked).") if patterns else ""
    return make_table("Communication against the link", [x for x in xs if f(x)], {
        "Method": lambda x: x.label,
        "Link": lambda x: f(x).rate,
        "Busiest link sent / received per step (MB)": lambda x: f"{f(x).sent / 1e6:.1f} / {f(x).received / 1e6:.1f}",
        "Time at link rate (ms)": lambda x: f"{1e3 * f(x).link_time:.1f}",
        "Directions counted": lambda x: f(x).link_time_how,
        "Comm overhead / link time": lambda x: "-" if overhead(x) is None else "~0 (in noise)" if
        verdicts.overhead_near_zero(x) else f"{overhead(x) / f(x).link_time:.2f}x",
        "Least the method moves (MB per direction)": lambda x: (
            f"{f(x).bound_bytes / 1e6:.1f} ({f(x).bound_how})" if f(x).bound_bytes else f(x).bound_how),
        "Measured / least": lambda x: f"{f(x).busiest / f(x).bound_bytes:.2f}x" if f(x).bound_bytes else "-",
        **patterns,
    }, "Time at link rate: the measured bytes at the declared rate, a lower bound on the time they take (a link "
       "carries both directions at once, so the larger counts; the p2p star's server sends, then receives, so "
       "there the two add up). The overhead can be below it only where communication runs during compute. Least "
       "the method moves: the bytes no implementation of the method can go below on the busiest link "
       "(analysis/links.py says why each is a bound)." + note)


def per_run_rows(xs, figure):
    """(label, experiment, run, value) for every run whose figure (a Run property) is recorded."""
    return [(run_label(x, r), x, r, v) for x in xs for r in x.runs for v in [getattr(r, figure)] if v is not None]


RANKS_NOTE = (
    "Each trainer's own compute per step (forward + backward, no waiting for the others), mean over the epochs; the "
    "straggler is named by the training side's rule (measure.py: the slowest rank, when its compute exceeds the "
    "others' median beyond a floor and beyond their step-to-step noise), its ratio = its compute / the others' "
    "median, over the epochs it was named in; others waited = its compute minus the others' median, per step, "
    "what every synchronous method waits for it. A run without epochs[].rank_compute (older kit files, the "
    "guide's) is not listed: not measured.")


def ranks_table(xs):
    rows = []
    for label, x, r, rc in per_run_rows(xs, "rank_compute"):
        rows.append({
            "Run": label,
            "Ranks (epochs)": f"{', '.join(map(str, rc.ranks))} ({ranks.epochs_text(rc.epochs)})",
            "Median compute (ms/step)": f"{1e3 * rc.median:.1f}",
            "Slowest rank (x others' median)": ranks.slowest_cell(rc),
            "Others waited for it (ms/step)": "; ".join(f"{1e3 * s.cost_per_step:.1f}" for s in rc.stragglers)
            or "none (no straggler)",
        })
    return Table("Which rank held the others back", ["Run", "Ranks (epochs)", "Median compute (ms/step)",
                                                     "Slowest rank (x others' median)",
                                                     "Others waited for it (ms/step)"],
                 rows, RANKS_NOTE)


DDP_TIMERS_NOTE = (
    "DDP's own timers (its logging data, _get_ddp_logging_data(): averages over the iterations it samples since "
    "the run began, as the last epoch recorded them): backward comm = from the launch of the first bucket's "
    "all-reduce to the end of the last; overlapped = the part of it before backward's compute ended; exposed = "
    "backward comm - overlapped. The yardstick is another definition: what the whole step costs more than the same "
    "step without communication (on a fixed batch before epoch 1), so an exchange fully hidden behind backward "
    "costs DDP time but no yardstick time.")


def ddp_timers_table(xs):
    ddps = [x for x in xs if x.kind == "baseline_ddp"]
    return make_table("DDP's own timers beside the yardstick", ddps, {
        "Method": lambda x: x.label,
        "Yardstick overhead (ms/step)": lambda x: cell(x, "yardstick.overhead", 1, 1e3),
        "DDP backward comm (ms)": lambda x: cell(x, "ddp_timers.comm", 1, 1e3),
        "Overlapped with backward compute (ms)": lambda x: cell(x, "ddp_timers.overlap", 1, 1e3),
        "Exposed (ms)": lambda x: cell(x, "ddp_timers.exposed", 1, 1e3),
        "Backward compute (ms)": lambda x: cell(x, "ddp_timers.compute", 1, 1e3),
        "Forward compute (ms)": lambda x: cell(x, "ddp_timers.forward", 1, 1e3),
    }, DDP_TIMERS_NOTE)


def recovery_table(xs):
    rows = [{"Run": run_label(x, r), "Restarts": recovery.restarts_cell(rec),
             "Steps redone": recovery.total_text(rec.steps_redone) if rec.restarts is not None else "-",
             "Time lost (s)": recovery.total_text(rec.seconds_lost, 1) if rec.restarts is not None else "-",
             "Checkpoints (share of the training loop)": recovery.checkpoint_cell(rec)}
            for x in xs for r in x.runs for rec in [r.recovery]]
    return Table("Restarts and checkpoints", list(rows[0]) if rows else [], rows,
                 "Restarts: torchrun --max-restarts attempts the run survived (its `restarts` list; none recorded: "
                 "the file has no such list); steps redone: trained again after resuming from the last checkpoint; "
                 "time lost: the seconds each failure cost, as the run measured them. Checkpoints: seconds writing "
                 "them (epochs[].checkpoint_time) over the training loop's (the epochs' train_time).")


def tradeoff_table(xs):
    return make_table("Speed and accuracy", xs, {
        "Method": lambda x: x.label,
        "Bytes on the wire per step (MB)": lambda x: number(x.wire_bytes, 1, 1e-6),
        "Avg throughput (img/s)": lambda x: cell(x, "throughput", 1),
        "Final train loss": lambda x: "n/a (modeled compute)" if x.modeled else cell(x, "final_train_loss", 4),
        "Final val accuracy (%)": lambda x: accuracy_cell(x, "final_val_accuracy"),
        "Staleness mean / max (updates)": lambda x: "-" if not x.asynchronous else
        f"{x.mean('staleness_mean'):.2f} / {x.mean('staleness_max'):.0f}",
    }, "Bytes on the wire: what one rank hands the all-reduce per step (fp16/bf16 compression halves it); staleness: "
       "server versions between a worker's pull and the application of its gradient (the asynchronous PS); whether "
       "a variant paid off is judged in the analysis against its plain variant.")


TIME_NOTE = (
    "Time to X%: the training seconds (the sum of the epochs' train_time: validation, epoch-end checkpoints, the "
    "yardstick and start-up excluded) until the end of the first epoch whose validation accuracy reached X% "
    "(validation runs once per epoch), mean ± spread over the seeds; from the run's time_to_target record where it "
    "was given that target (--target-accuracy), else from its epochs the same way. Targets: the runs' "
    "--target-accuracy, the highest accuracy every compared run reached, and round values below it. never: no "
    "epoch reached it (best: the run's best). n/a: accuracy means nothing (modeled compute, --synthetic); -: no "
    "validation accuracy recorded. Steps and epoch: to the first target; steps are unknown in the guide's files.")


def time_table(xs):
    goals = ttt.choose_targets(xs)
    compared = ttt.split(xs)[0]

    def at(x, goal):
        if x.accuracy_void:
            return f"n/a ({x.accuracy_void})"
        if x not in compared:
            return "-"
        g = ttt.reach(x, goal)
        if g.seconds is None:
            return f"never (best {x.mean('best_val_accuracy'):.1f}%)"
        return g.text(2)

    def first(x, what):
        g = ttt.reach(x, goals[0]) if x in compared else None
        est = None if g is None else getattr(g, what)
        if est is None:
            return "-"
        return f"{est.mean:.0f}" if not est.sd else est.text(1)  # the same in every seed: a whole number

    cells = {"Method": lambda x: x.label}
    for goal in goals:
        cells[f"Time to {goal:g}% (s)"] = lambda x, goal=goal: at(x, goal)
    if goals:
        cells[f"Steps to {goals[0]:g}%"] = lambda x: first(x, "steps")
        cells[f"Epoch to {goals[0]:g}%"] = lambda x: first(x, "epochs")
    return make_table("Time to accuracy", xs, cells, TIME_NOTE)


def has_tradeoffs(xs):
    return any(x.compressed or x.asynchronous for x in xs)


# title: (the Details group, the one-line caption of the text report)
CAPTIONS = {
    "Time to accuracy": ("Speed and accuracy", "Training seconds (validation excluded) until the validation "
                         "accuracy first reached each target; ± over seeds."),
    "Performance comparison": ("Speed and accuracy", "Every experiment; ± is the spread over seeds; speedup "
                               "against DDP of the same size (a PS: DDP on its trainers)."),
    "Speed and accuracy": ("Speed and accuracy", "Compression and the asynchronous PS against their plain "
                           "variants: bytes on the wire, speed, loss and accuracy."),
    "Communication per training step": ("Communication", "The yardstick: a step minus the same step without "
                                        "communication, on one fixed batch before epoch 1, in pairs."),
    "Communication as each script timed it": ("Communication", "Each script's own timers (the guide's "
                                              "avg_comm_time*): different things per method, not the yardstick."),
    "DDP's own timers beside the yardstick": ("Communication", "DDP's logging data: how long its all-reduces were "
                                              "in flight during backward, beside the yardstick."),
    "Communication against the link": ("Communication", "Bytes per step through the busiest node link at the "
                                       "declared rate, and the least the method must move there."),
    "Which rank held the others back": ("Ranks and restarts", "Each trainer's own compute per step (forward + "
                                        "backward) and the straggler as the run named it."),
    "Restarts and checkpoints": ("Ranks and restarts", "Restarts torchrun survived (--max-restarts) and what "
                                 "writing checkpoints cost."),
}


def build_tables(xs):
    """Every table the analysis shows, in order, each with its group and caption; the link, DDP timer, rank,
    recovery and trade-off tables only where some run measured what they show."""
    tables = [performance_table(xs)]
    if ttt.choose_targets(xs):
        tables.append(time_table(xs))
    if has_tradeoffs(xs):
        tables.append(tradeoff_table(xs))
    tables += [yardstick_table(xs), own_timers_table(xs)]
    if any(x.stat("ddp_timers.comm") for x in xs):
        tables.append(ddp_timers_table(xs))
    if any(link_figures(x) for x in xs):
        tables.append(link_table(xs))
    if per_run_rows(xs, "rank_compute"):
        tables.append(ranks_table(xs))
    if any(r.recovery.anything for x in xs for r in x.runs):
        tables.append(recovery_table(xs))
    for t in tables:
        t.group, t.caption = CAPTIONS.get(t.title, ("", ""))
    return tables


# --------------------------------------------------------------------------- rendering
def _column_width(header, cells, limit, lines=2):
    """A column's width: its widest cell (at most `limit`), and room for its header on `lines` lines."""
    words = max(len(w) for w in header.split()) if header.strip() else 1
    return min(max([len(c) for c in cells] + [words, -(-len(header) // lines)]), max(limit, words))


def _blocks(columns, widths, w0, width):
    """The columns (but the first) in blocks that fit `width` beside the first column."""
    blocks, current, used = [], [], w0
    for h in columns:
        if current and used + 2 + widths[h] > width:
            blocks.append(current)
            current, used = [], w0
        current.append(h)
        used += 2 + widths[h]
    return blocks + [current]


def _block(table, columns, widths):
    """Text lines of the table's rows for some of its columns: headers wrapped and bottom-aligned, the first
    column left-aligned, the others right-aligned (numbers line up), a cell wider than its column wrapped."""
    heads = [textwrap.wrap(h, w, break_long_words=False) or [""] for h, w in zip(columns, widths)]
    height = max(len(h) for h in heads)
    heads = [[""] * (height - len(h)) + h for h in heads]

    def lines(cells):
        wrapped = [textwrap.wrap(c, w, break_long_words=False, break_on_hyphens=False) or [""]
                   for c, w in zip(cells, widths)]
        rows = max(len(c) for c in wrapped)
        return ["  ".join((c[i] if i < len(c) else "").ljust(w) if k == 0 else
                          (c[i] if i < len(c) else "").rjust(w) for k, (c, w) in enumerate(zip(wrapped, widths)))
                .rstrip() for i in range(rows)]

    out = ["  ".join(h[i].ljust(w) if k == 0 else h[i].rjust(w) for k, (h, w) in enumerate(zip(heads, widths)))
           .rstrip() for i in range(height)]
    out.append("  ".join("-" * w for w in widths))
    for row in table.rows:
        out += lines([row[h] for h in columns])
    return out


def render_text(table, width=WIDTH):
    """The table as text within `width` columns: its title, its caption, headers over two or three lines; a table
    still too wide is split into blocks of columns, each repeating the first."""
    first, rest = table.columns[0], table.columns[1:]
    w0 = _column_width(first, [r[first] for r in table.rows], FIRST_COLUMN_MAX)
    room = width - w0 - 2
    # Headers on two lines, or on three where that saves a block.
    widths, blocks = None, None
    for lines in (2, 3):
        w = {h: _column_width(h, [r[h] for r in table.rows], room, lines) for h in rest}
        b = _blocks(rest, w, w0, width)
        if blocks is None or len(b) < len(blocks):
            widths, blocks = w, b
    out = [table.title + (f": {table.caption}" if table.caption and len(table.title) + len(table.caption) + 2 <= width
                          else "")]
    if table.caption and out[0] == table.title:
        out.append(table.caption)
    for i, block in enumerate(blocks):
        if i:
            out.append("")
        out += _block(table, [first, *block], [w0, *(widths[h] for h in block)])
    return "\n".join(out)


def render_markdown(table):
    body = ["| " + " | ".join(table.columns) + " |", "|" + "|".join(["---"] * len(table.columns)) + "|",
            *("| " + " | ".join(r[h] for h in table.columns) + " |" for r in table.rows)]
    return "\n".join([f"### {table.title}", "", *body] + (["", table.note] if table.note else []))


def speedup_lines(performance):
    """The guide's "speedup relative to Baseline DDP", read from the performance table by column name."""
    return [f"  {label}: {value}" for label, value in performance.column("Relative speedup").items()]
