"""The guide's answer, the report's first page: the two tables of GUIDE.md Section 4.2 as the guide lays them out,
then one short paragraph per analysis point it names (throughput, convergence, communication efficiency,
scalability). Each sentence carries its figure and its verdict (beyond noise, within it, or no noise measure),
taken from the same judgements as the Details (analysis.verdicts), and says what to run where these runs cannot
tell. A run with modeled compute is named so in every row and sentence, and never set against a real run."""
import re
import textwrap

from . import curves, verdicts
from . import time_to_target as ttt
from .links import physical_limit
from .runs import KINDS, cluster_groups, same_compute, scaling_groups, twin_ddp
from .stats import compare, ms, two_sigma
from .tables import WIDTH, Table, accuracy_cell, cell, render_text

GUIDE_NAMES = {"baseline_ddp": "Baseline DDP", "all_reduce": "Manual All-Reduce", "ps": "Parameter Server"}
SHORT = {"baseline_ddp": "DDP", "all_reduce": "the all-reduce", "ps": "the PS"}
SEEDS_RUN = 'bash run_all.sh --seeds "0 1 2"'
CLUSTER_RUN = "bash run_all.sh --cluster 4x1 --link-rate 1gbit"


# --------------------------------------------------------------------------- which run each row shows
def guide_rows(xs):
    """{kind: the experiment its guide row shows, or None}: a complete run of the script's default variant first,
    then the compute of DDP's row (real before modeled), its size, the kit's file before a guide-format one, the
    most seeds."""
    def rank(x):
        return (not x.complete, x.variant not in (KINDS[x.kind][1][0], ""), x.modeled, x.guide_format, -len(x.runs))

    ddps = sorted((x for x in xs if x.kind == "baseline_ddp"), key=rank)
    picks = {"baseline_ddp": ddps[0] if ddps else None}
    ddp = picks["baseline_ddp"]
    for kind in ("all_reduce", "ps"):
        def near(x):
            if ddp is None:
                return (False, False)
            return (not same_compute(x, ddp), ddp.world_size not in (x.world_size, x.trainers))
        candidates = [x for x in xs if x.kind == kind]
        picks[kind] = min(candidates, key=lambda x: (rank(x)[:2], near(x), rank(x)[2:])) if candidates else None
    return picks


def name(x, ref=None):
    """How a sentence names a row's run: "DDP", "the PS (modeled compute)"; "DDP on 2" for a DDP other than the
    row's (ref)."""
    text = SHORT[x.kind]
    if x.kind == "baseline_ddp" and ref is not None and x is not ref:
        text += f" on {x.world_size}"
    return text + (" (modeled compute)" if x.modeled else "")


def cap(text):
    return text[:1].upper() + text[1:]


def est(x, figure, digits=1, scale=1.0):
    """ "204.8 ± 28.0" (± the spread over seeds), or "-"."""
    return cell(x, figure, digits, scale)


def judged(v, more, less, tie="within"):
    """A verdict in words: "slower, beyond the seed-to-seed spread, ±56.0 img/s", "within ...", or no measure."""
    if v.beyond is None:
        return "not judged, no noise measure (one seed, no step-time spread)"
    if v.within:
        return f"{tie} {v.measure}"
    return f"{more if v.diff > 0 else less}, beyond {v.measure}"


# --------------------------------------------------------------------------- the two tables
def relative_speedup(x, ddp):
    if x is ddp:
        return "1.00x (baseline)"
    if ddp is None:
        return "n/a (no DDP run)"
    if not same_compute(x, ddp):
        return "n/a (modeled vs real)"
    ratio = x.mean("throughput") / ddp.mean("throughput")
    return f"{ratio:.2f}x" + (f" (vs DDP on {ddp.world_size})" if x.world_size != ddp.world_size else "")


def performance_table(picks):
    """The guide's first table: one row per method, as the guide names them."""
    ddp, rows = picks["baseline_ddp"], []
    for kind, method in GUIDE_NAMES.items():
        x = picks[kind]
        if x is None:
            rows.append({"Method": method, **dict.fromkeys(PERF_COLUMNS[1:], "-")})
            continue
        rows.append({"Method": method + (" (modeled compute)" if x.modeled else "")
                     + ("" if x.complete else " (incomplete)"),
                     "Avg throughput (img/s)": est(x, "throughput"),
                     "Avg train time/epoch (s)": est(x, "time_per_epoch", 2),
                     "Best accuracy (%)": accuracy_cell(x, "best_val_accuracy"),
                     "Relative speedup": relative_speedup(x, ddp)})
    return Table("Performance (GUIDE.md Section 4.2, first table)", list(PERF_COLUMNS), rows)


PERF_COLUMNS = ("Method", "Avg throughput (img/s)", "Avg train time/epoch (s)", "Best accuracy (%)",
                "Relative speedup")
COMM_COLUMNS = ("Method", "Param pull (ms)", "Grad push (ms)", "All-Reduce (ms)", "Total comm (ms)")


def comm_table(picks):
    """The guide's second table: the scripts' own communication timers, in ms with two decimals (XX.XX)."""
    ar, ps = picks["all_reduce"], picks["ps"]
    rows = [{"Method": "Baseline DDP", "Param pull (ms)": "-", "Grad push (ms)": "-", "All-Reduce (ms)": "-",
             "Total comm (ms)": "(implicit, handled by PyTorch)"}]
    wait = "-" if ar is None else est(ar, "comm_wait", 2, 1e3)
    rows.append({"Method": "Manual All-Reduce", "Param pull (ms)": "-", "Grad push (ms)": "-",
                 "All-Reduce (ms)": wait, "Total comm (ms)": wait})
    pull, push = ("-", "-") if ps is None else (est(ps, "comm_pull", 2, 1e3), est(ps, "comm_push", 2, 1e3))
    if "-" not in (pull, push):
        total = f"{pull} + {push} = {1e3 * ps.mean('comm_total'):.2f}"
    else:
        total = "-" if ps is None else est(ps, "comm_total", 2, 1e3)
    rows.append({"Method": "Parameter Server", "Param pull (ms)": pull, "Grad push (ms)": push,
                 "All-Reduce (ms)": "-", "Total comm (ms)": total})
    for row, kind in zip(rows, KINDS):
        if picks[kind] is not None and picks[kind].modeled:
            row["Method"] += " (modeled compute)"
    return Table("Communication time per step (GUIDE.md Section 4.2, second table)", list(COMM_COLUMNS), rows)


def rows_line(picks):
    """Which run each row shows."""
    return "Rows: " + "; ".join(f"{GUIDE_NAMES[k]} = {x.label if x else 'no run'}" for k, x in picks.items()) + \
        ". Every run and variant is under Details."


# --------------------------------------------------------------------------- the points
def time_point(picks, xs):
    """Which reached the target accuracy first, and by how much, beyond noise or not (analysis.time_to_target)."""
    shown = [x for x in picks.values() if x is not None]
    _, void, unmeasured = ttt.split(shown)
    goals, out, no_noise = ttt.choose_targets(shown), [], False
    if goals:
        goal = goals[0]
        done, missed = ttt.ranking(shown, goal)
        out.append(f"Time to {goal:g}% val accuracy, {ttt.headline_words(shown, goal)} (training seconds, validation "
                   "excluded, to the end of the epoch that reached it).")
        if done:
            out.append(", ".join(f"{cap(name(g.x)) if i == 0 else name(g.x)} {g.seconds.text(2)} s (epoch "
                                 f"{g.epochs.mean:.0f})" for i, g in enumerate(done)) + ".")
        if len(done) > 1:
            out.append(f"{cap(name(done[0].x))} reached {goal:g}% first.")
        for g in done[1:]:
            v = ttt.compare_reach(g, done[0])
            head = f"{cap(name(g.x))} took {v.diff:.2f} s more" + (f" ({v.ratio:.2f}x)" if v.ratio else "")
            if v.beyond is None:
                out.append(f"{head}, not judged (one seed, no noise measure).")
                no_noise = True
            else:
                out.append(f"{head}: {'beyond' if v.beyond else 'within'} {v.measure}"
                           + ("" if v.beyond else ", no measurable lead") + ".")
        for g in missed:
            n = len(g.x.runs)
            out.append(f"{cap(name(g.x))} never reached it" + (f" in {len(g.missed)} of {n} seeds" if
                                                                 len(g.missed) < n else "") + ".")
    if void:
        out.append(f"Not judged for {', '.join(name(x) for x in void)}: "
                   + ("modeled compute trains a proxy" if any(x.modeled for x in void) else "--synthetic: random images")
                   + ", so its accuracy means nothing.")
    if unmeasured:
        out.append(f"Not measured for {', '.join(name(x) for x in unmeasured)}: its file records no validation "
                   "accuracy per epoch.")
    if not goals:
        out.insert(0, "No run here has a meaningful validation accuracy per epoch, so no time to accuracy "
                      "(plots/accuracy_curves.png).")
        return out
    if no_noise:
        out.append(f"For a noise measure, run several seeds: {SEEDS_RUN}.")
    out.append("Other targets are under Details; see plots/time_to_accuracy.png and plots/accuracy_vs_time.png.")
    return out


def throughput_point(picks, xs):
    ddp = picks["baseline_ddp"]
    out, no_noise, tie = [], False, False
    if ddp is not None:
        out.append(f"{cap(name(ddp))} trains {est(ddp, 'throughput')} img/s on {ddp.world_size} processes.")
    for x in (picks["all_reduce"], picks["ps"]):
        if x is None:
            continue
        where = f" on {x.trainers} worker{'s' if x.trainers > 1 else ''} and a server" \
            if x.trainers < x.world_size else ""
        head = f"{cap(name(x))} trains {est(x, 'throughput')} img/s{where}"
        if ddp is None or not same_compute(x, ddp):
            out.append(head + ("; no DDP run to compare it with." if ddp is None else
                               f", not compared with {name(ddp)}: modeled and real images are not alike."))
            continue
        v = verdicts.compare_throughput(x, ddp)
        out.append(f"{head}, {v.ratio:.2f}x {name(ddp)}: {judged(v, 'faster', 'slower', 'a tie within')}.")
        no_noise, tie = no_noise or v.beyond is None, tie or v.within
        out += throughput_why(x, v, ddp)
    if no_noise:
        out.append(f"For a noise measure, run several seeds: {SEEDS_RUN}.")
    elif tie:
        out.append('To resolve a tie, run more seeds (--seeds "0 1 2 3") or longer epochs.')
    return out


def throughput_why(x, v, ddp):
    """Why a method trails DDP, from its own timers (the guide asks for the reason)."""
    if v.diff >= 0 and not v.within:
        return []
    if x.kind == "ps":
        pull, push, update = x.mean("comm_pull"), x.mean("comm_push"), x.mean("server_update")
        if pull is None or push is None:
            return []
        text = f"Its workers wait {ms(pull)} to pull and {ms(push)} to push per step"
        text += f", and {ms(update)} while the server updates" if update is not None else ""
        return [text + (", tensor by tensor point to point" if x.comm == "p2p" else "") + " (the script's timers)."]
    if v.within:
        return [] if not x.wire_bytes else [
            f"Both all-reduce the same {x.wire_bytes / 1e6:.1f} MB of gradients a step ({x.sync or 'the guide file'} "
            "here), so a tie is what to expect."]
    wait = x.mean("comm_wait")
    if wait is None:
        return []
    return [f"{cap(name(ddp))}'s all-reduce runs inside backward; {name(x)} waits {ms(wait)} per step after "
            "backward (its own timer)."]


def convergence_point(picks, xs):
    ddp = picks["baseline_ddp"]
    out, no_floor = [], False
    void = [x for x in picks.values() if x is not None and x.modeled]
    for x in (picks["all_reduce"], picks["ps"]):
        if x is None or x.modeled:
            continue
        ref = twin_ddp(x, xs) or (ddp if ddp is not None and same_compute(x, ddp) else None)
        judged_curves = verdicts.compare_curves(x, ref) if ref is not None and not ref.modeled else None
        if judged_curves is None:
            continue
        diff, v = judged_curves
        head = f"{cap(name(x))}'s loss curve is {diff:.4f} from {name(ref, ddp)}'s on average"
        if v.within:
            out.append(f"{head}, within the seed-to-seed spread of {v.noise:.4f}: they converge alike.")
        elif v.beyond:
            out.append(f"{head}, {diff / v.noise:.1f}x the seed-to-seed spread of {v.noise:.4f}: they converge "
                       "differently.")
        else:
            agree, n = curves.steps_matching(x.first, ref.first)
            steps = f"the first {agree} of {n} steps' losses match" if agree else "their losses differ from step 1"
            out.append(f"{head}, not judged: one seed each, no noise floor; {steps}.")
            no_floor = True
    accuracy = [(x, accuracy_cell(x, "best_val_accuracy")) for x in picks.values() if x is not None]
    if any(c != "-" for _, c in accuracy):
        out.append("Best val accuracy: " + ", ".join(
            f"{name(x)} " + ("not recorded" if c == "-" else c + ("%" if c[0].isdigit() else ""))
            for x, c in accuracy) + ".")
    for x in (picks["all_reduce"], picks["ps"]):
        if x is None or ddp is None or x.accuracy_void or ddp.accuracy_void or not same_compute(x, ddp) \
                or x.mean("best_val_accuracy") is None or ddp.mean("best_val_accuracy") is None:
            continue
        v = verdicts.compare_by_seeds(x, ddp, "best_val_accuracy", " points")
        side = "above" if v.diff > 0 else "below"
        gap = f"the same as {name(ddp)}'s" if abs(v.diff) < 0.005 else f"{abs(v.diff):.2f} points {side} {name(ddp)}'s"
        words = " (not judged: one seed each, no noise floor)" if v.beyond is None else \
            f": {'beyond' if v.beyond else 'within'} {v.measure}"
        out.append(f"{cap(name(x))}'s is {gap}{words}.")
        no_floor = no_floor or v.beyond is None
    if void:
        out.append(f"Not judged for {', '.join(name(x) for x in void)}: modeled compute trains a proxy, so its loss "
                   "and accuracy mean nothing.")
    synthetic = [x for x in picks.values() if x is not None and x.accuracy_void == "synthetic"]
    if synthetic:
        out.append(f"Accuracy means nothing for {', '.join(name(x) for x in synthetic)} (--synthetic: random "
                   "images); the loss curves still compare.")
    if no_floor:
        out.append(f"For a noise floor, run several seeds: {SEEDS_RUN} (plots/loss_curves.png draws the band).")
    return out or ["No per-step losses to compare (see plots/loss_curves.png)."]


def communication_point(picks, xs):
    ddp = picks["baseline_ddp"]
    measured = [x for x in picks.values() if x is not None and x.mean("yardstick.overhead") is not None]
    if not measured:
        return ["The yardstick (one definition for all three) is not in these files; the table above has the "
                "scripts' own timers only.", "To measure it, run the kit's scripts: bash run_all.sh."]
    pairs = max(r.yardstick.pairs or 0 for x in measured for r in x.runs if r.yardstick)
    items = []
    for i, x in enumerate(measured):
        share = "" if verdicts.overhead_near_zero(x) else \
            f" ({100 * x.mean('yardstick.share'):.1f}%{' of its step' if i == 0 else ''})"
        items.append(f"{name(x)} {verdicts.overhead_text(x)}{share}")
    out = [f"Overhead per step (the yardstick, {pairs} pairs on one batch): " + ", ".join(items) + "."]
    within = False
    for x in (picks["all_reduce"], picks["ps"]):
        if x not in measured or ddp not in measured:
            continue
        if not same_compute(x, ddp):
            out.append(f"{cap(name(x))}'s overhead is not compared with {name(ddp)}'s: modeled and real compute.")
            continue
        v, ratio = verdicts.compare_overhead(x, ddp), verdicts.overhead_ratio(x, ddp)
        if v.within:
            out.append(f"{cap(name(x))}'s and {name(ddp)}'s differ by {ms(abs(v.diff))}: within {v.measure}.")
            within = True
        elif ratio is not None:
            out.append(f"{cap(name(x))}'s is {ratio:.2f}x {name(ddp)}'s: beyond {v.measure}.")
        else:
            zero, other = (x, ddp) if verdicts.overhead_near_zero(x) else (ddp, x)
            out.append(f"{cap(name(zero))}'s overhead is within noise of 0; {name(other)}'s is "
                       f"{ms(other.mean('yardstick.overhead'))}, beyond {v.measure}.")
    out += limit_sentences(measured) + reconcile(picks) + communication_why(picks)
    out.append("See plots/communication_overhead.png (whiskers: min-max over the pairs).")
    if within:
        if all(verdicts.overhead_se(x) is not None for x in measured):
            out.append("More --overhead-pairs shrink the standard error the verdict uses (as 1 / sqrt(pairs)).")
        else:
            out.append("More --overhead-pairs steady the medians, yet widen the min-max spread the verdict uses; "
                       f"with {verdicts.SE_MIN_PAIRS}+ pairs the kit judges by their standard error.")
        out.append(f"A real link separates the methods better: {CLUSTER_RUN}.")
    elif all(not x.network for x in measured):
        out.append(f"On loopback every byte is a memory copy; for a network: {CLUSTER_RUN}.")
    return out


def limit_sentences(measured):
    """The physical limit on the yardstick's own batch (one measurement): limit / step per method."""
    lims = [(x, physical_limit(x)) for x in measured]
    lims = [(x, lim) for x, lim in lims if lim is not None]
    if not lims:
        return []
    words = {"at": lambda lim: f"at it within noise ({lim.reached_number})", "above": lambda lim: lim.reached_number,
             "impossible": lambda lim: f"{lim.reached_number}, beyond noise above 1: a measurement problem"}
    loopback = all(lim.link is None for _, lim in lims)
    limit = "the step without communication" if loopback else "compute or the bytes' link time, the larger"
    return [f"Limit / step on that batch (limit: {limit}; 1.00 = at it): "
            + ", ".join(f"{name(x)} {words[lim.verdict](lim)}" for x, lim in lims) + "."]


def reconcile(picks):
    """One sentence for each pair whose throughput and overhead verdicts point different ways."""
    ddp, out = picks["baseline_ddp"], []
    for x in (picks["all_reduce"], picks["ps"]):
        if x is None or ddp is None or not same_compute(x, ddp) or x.mean("yardstick.overhead") is None \
                or ddp.mean("yardstick.overhead") is None:
            continue
        t, o = verdicts.compare_throughput(x, ddp), verdicts.compare_overhead(x, ddp)
        fast, slow = (x, ddp) if t.diff > 0 else (ddp, x)
        if t.beyond and o.within:
            pairs = max(r.yardstick.pairs or 0 for r in x.runs + ddp.runs if r.yardstick)
            out.append(f"{cap(name(fast))} trains faster than {name(slow)} beyond {t.measure.split(',')[0]}; the "
                       f"yardstick's {o.noise * 1e3:.0f} ms spread over {pairs} pairs hides their "
                       f"{abs(o.diff) * 1e3:.0f} ms overhead gap.")
        elif t.beyond and o.beyond and (o.diff > 0) == (t.diff > 0):
            out.append(f"{cap(name(fast))} trains faster though its overhead is larger, both beyond noise: the "
                       "yardstick times one batch, the throughput every step with data and overlap.")
        elif t.within and o.beyond:
            cheap = x if o.diff < 0 else ddp
            out.append(f"{cap(name(cheap))}'s {abs(o.diff) * 1e3:.0f} ms smaller overhead (beyond the pairs' spread) "
                       f"does not show in throughput (within {t.measure.split(',')[0]}).")
    return out


def communication_why(picks):
    """The guide's reason, with the run's own sizes: a single server is synchronous and serial."""
    ps = picks["ps"]
    if ps is None or not ps.single_server or not ps.state_bytes:
        return []
    mb = ps.state_bytes / 1e6
    how = "tensor by tensor, point to point" if ps.comm == "p2p" else "by broadcast and reduce"
    workers = f"{ps.trainers} worker{'s' if ps.trainers > 1 else ''}"
    n = picks["baseline_ddp"].world_size if picks["baseline_ddp"] is not None else ps.trainers
    return [f"{cap(name(ps))} is serial: one server sends the {mb:.0f} MB state to {workers} and takes the "
            f"gradients back ({how}).", f"A ring all-reduce instead moves 2(N-1)/N = {2 * (n - 1) / n:.2f} gradient copies per rank "
            f"(N = {n}), over every link at once."]


def scalability_point(picks, xs):
    shown = [x for x in picks.values() if x is not None]
    out = []
    groups = {k: g for k, g in scaling_groups(xs).items() if any(x in shown for x in g)}
    for (kind, variant, model), group in groups.items():
        a, b = group[0], group[-1]
        ta, tb = a.mean("throughput"), b.mean("throughput")
        ideal = ta * b.trainers / a.trainers
        noises = [verdicts.throughput_noise(a)[0], verdicts.throughput_noise(b)[0]]
        noise = two_sigma(noises[0] * b.trainers / a.trainers, noises[1]) if None not in noises else None
        v = compare(tb, ideal, noise, f"the throughput noise, ±{noise:.1f} img/s" if noise is not None else "")
        out.append(f"{cap(name(a))}: {ta:.1f} img/s at {a.world_size} processes, {tb:.1f} at {b.world_size}: "
                   f"{100 * tb / ideal:.0f}% of linear, {judged(v, 'above', 'below', 'linear within')}.")
    for key, group in cluster_groups(xs).items():
        points = [x for x in group if x.mean("yardstick.overhead") is not None]
        if len(points) < 2 or not any(x.kind == key[0] and x.variant == key[1] for x in shown):
            continue
        a, b = points[0], points[-1]
        r = verdicts.overhead_ratio(b, a)
        growth = f"{r:.2f}x" if r is not None else f"{ms(a.mean('yardstick.overhead'))} to " \
                                                      f"{ms(b.mean('yardstick.overhead'))}"
        out.append(f"{cap(name(a))}'s overhead grows {growth} from {a.network['nodes']} to {b.network['nodes']} "
                   f"nodes ({verdicts.compare_overhead(b, a).words}).")
    measured = bool(out)
    if not measured:
        sizes = sorted({x.trainers for x in shown})
        out.append(f"These runs are at one size each ({', '.join(map(str, sizes))} trainers), so scaling is not "
                   "measured here.")
    eff = [] if measured else [x for x in shown if x.mean("scaling_efficiency") is not None]
    if eff:
        out.append("Throughput against linear in trainers (one batch's no-communication step): "
                   + ", ".join(f"{name(x)} {est(x, 'scaling_efficiency', 1, 100)}%" for x in eff) + ".")
        ddp, ps = picks["baseline_ddp"], picks["ps"]
        if ddp in eff and ps in eff and same_compute(ps, ddp):
            v = verdicts.compare_by_seeds(ps, ddp, "scaling_efficiency", " points", 1, 100)
            words = " (not judged: one seed each)" if v.beyond is None else \
                f": {'beyond' if v.beyond else 'within'} {v.measure}"
            out.append(f"{cap(name(ps))}'s is {abs(v.diff):.1f} points {'above' if v.diff > 0 else 'below'} "
                       f"{name(ddp)}'s{words}.")
    ps = picks["ps"]
    if ps is not None and ps.single_server and ps.state_bytes:
        out.append(f"A single server's link carries the {ps.state_bytes / 1e6:.0f} MB state out and in for every "
                   f"worker ({2 * ps.trainers} copies a step here), a ring all-reduce rank's under 2: it grows with "
                   "the workers.")
    if not measured:
        out.append(f'To measure it: bash run_all.sh --sweep "2 4" (processes), or {CLUSTER_RUN} (emulated nodes).')
    return out


POINTS = (("Time to accuracy", time_point), ("Throughput", throughput_point), ("Convergence", convergence_point),
          ("Communication efficiency", communication_point), ("Scalability", scalability_point))


def fill(text, width=WIDTH, indent=""):
    """textwrap.fill that never breaks inside a quoted argument ("0 1 2")."""
    text = re.sub(r'"[^"]*"', lambda m: m.group().replace(" ", "\0"), text)
    return textwrap.fill(text, width, subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False).replace("\0", " ")


def paragraph(title, sentences, width=WIDTH):
    return fill(f"{title}. " + " ".join(sentences), width)


def answer_lines(xs):
    """The first page: the guide's two tables, which runs they show, and the four points."""
    picks = guide_rows(xs)
    perf, comm = performance_table(picks), comm_table(picks)
    lines = ["The guide's answer (GUIDE.md Section 4.2)", "", render_text(perf),
             fill(rows_line(picks)), "",
             render_text(comm),
             "The scripts' own timers time different things per method; the yardstick below is one for all three.",
             ""]
    for title, point in POINTS:
        lines += [paragraph(title, point(picks, xs)), ""]
    return lines


def sentences(xs):
    """{point: [sentences]} of the answer (for tests and callers that want them unwrapped)."""
    picks = guide_rows(xs)
    return {title: point(picks, xs) for title, point in POINTS}
