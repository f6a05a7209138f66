"""The report's prose: every sentence is built from a figure and, where it judges a difference, from the same
Verdict (analysis.verdicts) as the table cell that shows it, so the tables and the text tell one story. The
report opens with the guide's answer (analysis.answer), then the Details, grouped; every line within 120 columns
(a longer sentence wraps, its continuation indented)."""
import time

from . import curves, ranks, recovery, verdicts
from . import time_to_target as ttt
from .answer import answer_lines, fill
from .links import cluster_name, cluster_points, link_figures, node_link_words, physical_limit
from .runs import KINDS, baseline_for, cluster_groups, plain_variant, run_label, same_compute, scaling_groups, twin_ddp
from .stats import compare, ms
from .tables import WIDTH, render_text, several_per_node

DOCS = "docs/reading_the_report.md"
WHY_RANKINGS_DIFFER = (
    "The two measure different things: the overhead is one fixed batch before epoch 1 (data loading excluded), "
    "the throughput every timed step of the epochs, with data loading and the overlap as it happens in training")


# --------------------------------------------------------------------------- the run context
def context_lines(xs):
    """The run context; a field that differs between runs is listed per experiment and flagged. "-": not
    recorded (a guide-format file records none of it)."""
    def network(d):
        n = d.get("network")
        if "network" not in d:
            return None
        return "loopback / not declared" if not n else \
            f"{n.get('topology') or 'declared link'} ({n.get('link_rate')}, {n.get('procs_per_node')} process(es) per node)"

    def lr(d):
        args = d.get("args")
        return None if not isinstance(args, dict) or "lr" not in args else \
            "{lr} {lr_scheduler}, warm-up {lr_warmup_epochs} epochs".format(
                **{"lr_scheduler": "constant", "lr_warmup_epochs": 0, **args})

    fields = [("dataset", lambda d: "{name} ({train_size} train / {val_size} val images, {num_classes} classes)"
               .format(**d["dataset"]) if isinstance(d.get("dataset"), dict) else None),
              ("model", lambda d: d.get("arch")), ("image size (px)", lambda d: d.get("image_size")),
              ("device", lambda d: d.get("device")), ("backend", lambda d: d.get("backend")),
              ("network", network),
              ("compute", lambda d: (d["compute_model"].get("label") or d["compute_model"].get("spec") or "modeled")
               if isinstance(d.get("compute_model"), dict) and d["compute_model"] else "real"),
              ("world size (processes)", lambda d: d.get("world_size")),
              ("batch size per trainer", lambda d: d.get("batch_size")), ("epochs", lambda d: len(d["epochs"])),
              ("learning rate", lr), ("torch", lambda d: d.get("torch_version")), ("host", lambda d: d.get("host"))]
    lines, warn, unrecorded = [], [], []
    for name, get in fields:
        values = {x.label: get(x.first.data) for x in xs}
        shown = lambda v: "-" if v is None else v  # noqa: E731
        if all(v is None for v in values.values()):
            unrecorded.append(name)
        elif len({str(v) for v in values.values()}) == 1:
            lines.append(f"  {name}: {shown(next(iter(values.values())))}")
        else:
            lines.append(f"  {name}: " + "; ".join(f"{k}: {shown(v)}" for k, v in values.items()))
            known = {str(v) for v in values.values() if v is not None}
            if len(known) > 1 and name in ("dataset", "model", "image size (px)", "device", "backend", "network",
                                           "compute", "batch size per trainer", "learning rate"):
                warn.append(name)
    lines.append("  seeds: " + "; ".join(f"{x.label}: {', '.join('-' if s is None else str(s) for s in x.seeds)}"
                                         for x in xs))
    if unrecorded:
        lines.append(f"  not recorded in the files: {', '.join(unrecorded)}")
    if warn:
        lines.append(f"  warning: runs differ in {', '.join(warn)}: compare them with care")
    return lines


# --------------------------------------------------------------------------- speed
def throughput_lines(xs):
    """The speed ranking at each world size (complete runs only), each gap judged against the runs' noise."""
    out = []
    for ws, key in sorted({(x.world_size, x.compute_key or "") for x in xs}):
        same = sorted([x for x in xs if x.world_size == ws and (x.compute_key or "") == key and x.complete],
                      key=lambda x: -x.mean("throughput"))
        if len(same) < 2:
            continue
        best = same[0]
        judged = [(x, verdicts.compare_throughput(best, x)) for x in same[1:]]
        noiseless = all(v.beyond is None for _, v in judged)
        parts = [f"{v.ratio:.2f}x {x.label} ({x.mean('throughput'):.1f})" + ("" if noiseless else f" ({v.words})")
                 for x, v in judged]
        where = f"{ws} processes" + (f", modeled compute {key}" if key else "")
        text = (f"- Throughput at {where}: {best.label} has the highest, {best.mean('throughput'):.1f} "
                "img/s; that is " + ", ".join(parts))
        if noiseless:
            text += (". None of these runs has a noise measure for its throughput (one seed each, and no "
                     "step_time_stdev in the files), so the ranking is not judged against noise")
        elif judged[0][1].within:
            text += f"; its lead over {judged[0][0].label} is within noise: no measurable ranking between the two"
        out.append(text + ".")
    return out


def time_lines(xs):
    """Per target, every compared experiment's time to it against the first to get there, each gap judged against
    the seeds' spread (the table "Time to accuracy" has the figures; the first page the guide rows')."""
    out = []
    for goal in ttt.choose_targets(xs):
        done, missed = ttt.ranking(xs, goal)
        if not done:
            continue
        first = done[0]
        parts = []
        for g in done[1:]:
            v = ttt.compare_reach(g, first)
            parts.append(f"{g.x.label} {g.text(2)} s ({v.ratio:.2f}x; " +
                         (v.words if v.beyond is not None else "one seed: not judged") + ")")
        text = f"- Time to {goal:g}%: {first.x.label} first, {first.text(2)} s"
        text += ("; then " + "; ".join(parts)) if parts else ""
        text += (f"; never reached by {', '.join(g.x.label for g in missed)}") if missed else ""
        out.append(text + ".")
    return out


def mixed_compute_lines(xs):
    """Where modeled and real runs are mixed: they are never compared as if alike, once in words."""
    modeled = [x for x in xs if x.modeled]
    if not modeled or len(modeled) == len(xs):
        return []
    models = "; ".join(sorted({str(x.compute_model.get("label") or x.compute_key) for x in modeled}))
    return [f"- Modeled and real compute are mixed here ({models}): a modeled run's throughput counts modeled "
            "images and its loss and accuracy are a proxy's, so it is ranked, timed and compared only against runs "
            "of the same compute model, never against a real run."]


def ranking_lines(xs):
    """Where the fastest method (by throughput, not within noise of the other) has the larger communication
    overhead, beyond the pairs' spread, and why that can happen."""
    out = []
    for ws, key in sorted({(x.world_size, x.compute_key or "") for x in xs}):
        same = [x for x in xs if x.world_size == ws and (x.compute_key or "") == key and x.complete
                and x.mean("yardstick.overhead") is not None]
        if len(same) < 2:
            continue
        best = max(same, key=lambda x: x.mean("throughput"))
        parts = []
        for x in same:
            t, v = verdicts.compare_throughput(best, x), verdicts.compare_overhead(best, x)
            if x is not best and not t.within and v.beyond and v.diff > 0:
                parts.append(f"{x.label} ({t.ratio:.2f}x its throughput, {t.words}; overhead {ms(v.a)} against "
                             f"{ms(v.b)}, {v.words})")
        if parts:
            out.append(f"- Rankings disagree at {ws} processes: {best.label} has the highest throughput, yet a larger "
                       f"communication overhead than " + "; ".join(parts) + f". {WHY_RANKINGS_DIFFER}.")
    return out


# --------------------------------------------------------------------------- communication
def overhead_lines(xs):
    """Each experiment's yardstick, then each against the DDP of its world size, judged against the pairs'
    spread."""
    out = []
    for x in xs:
        overhead = x.stat("yardstick.overhead")
        if overhead is None:
            continue
        lo, hi = verdicts.overhead_range(x)
        step, share = x.stat("yardstick.step_time"), x.stat("yardstick.share")
        pairs = next(r.yardstick.pairs for r in x.runs if r.yardstick)
        text = (f"- {x.label}: communication overhead {ms(overhead.mean)} per step"
                + (f" (± {ms(overhead.sd)} over seeds)" if overhead.sd is not None else "")
                + f" (min {ms(lo)}, max {ms(hi)} over {pairs} pairs)")
        if verdicts.overhead_near_zero(x):
            text += f", within noise of zero on its {ms(step.mean)} step on the yardstick's fixed batch"
        else:
            text += f" = {share.text(1, 100)}% of its {ms(step.mean)} step on the yardstick's fixed batch"
        text += f" (the epochs' measured step: {ms(x.mean('batch_time'))}, another measurement)"
        if x.stat("scaling_efficiency") is not None:
            text += f"; scaling efficiency {x.stat('scaling_efficiency').text(1, 100)}%"
        hidden = verdicts.hidden(x)
        if hidden:
            text += f"; {hidden.words}"
        traced = x.first.profile
        if traced:
            text += (f"; its profiler trace ({traced['steps']} steps, {traced['comm_source']}) shows "
                     f"{100 * traced['overlap_share']:.0f}% of {ms(traced['comm_time'])} of communication "
                     "overlapping compute")
        out.append(text + ".")
    for x in xs:
        ref = baseline_for(x, xs)
        if ref is None or ref is x or x.mean("yardstick.overhead") is None or ref.mean("yardstick.overhead") is None:
            continue
        v, ratio = verdicts.compare_overhead(x, ref), verdicts.overhead_ratio(x, ref)
        if v.within:
            out.append(f"- {x.label} vs {ref.label}: overheads {ms(v.a)} and {ms(v.b)} are within noise (the "
                       f"difference, {ms(abs(v.diff))}, is {v.words}).")
        elif ratio is not None:
            out.append(f"- {x.label} vs {ref.label}: overhead {ms(v.a)} against {ms(v.b)} ({ratio:.2f}x; {v.words}).")
        else:  # one of them within noise of 0: no ratio across it
            zero, other = (x, ref) if verdicts.overhead_near_zero(x) else (ref, x)
            out.append(f"- {x.label} vs {ref.label}: {zero.label}'s overhead is within noise of 0; {other.label}'s "
                       f"is {verdicts.overhead_text(other)} ({v.words}).")
    guide = [x for x in xs if x.guide_format]
    if guide:
        out.append("- Communication overhead (the yardstick: a training step minus the same step without "
                   "communication, on a fixed batch before epoch 1) is not in " + ", ".join(
                       r.path.name for x in guide for r in x.runs) + ": only the kit's scripts measure it "
                   "(run them for a comparison on one footing). The communication times shown for these files are "
                   "their scripts' own timers (table 'Communication as each script timed it'), which time different "
                   "things in each method.")
    return out


def limit_lines(xs):
    """Each method's step against its physical limit, both on the yardstick's fixed batch (links.physical_limit,
    the table's figures): the larger of its compute (the step without communication) and its measured bytes'
    time at the link rate, against the same batch's step with communication, judged against the pairs' spread."""
    out = []
    for x in xs:
        lim = physical_limit(x)
        if lim is None:
            continue
        if lim.link:
            f = lim.link
            text = (f"- Physical limit, {x.label}: the larger of its compute (the step without communication, "
                    f"{ms(lim.compute)}) and its bytes' link time ({f.sent / 1e6:.1f} MB out, {f.received / 1e6:.1f} "
                    f"MB in per step through the busiest node link at {f.rate}: {ms(f.link_time)}, "
                    f"{f.link_time_how}): {ms(lim.limit)}, set by the {lim.bound_by}")
        else:
            text = (f"- Physical limit, {x.label}: no declared link (loopback), so the limit is the compute alone: "
                    f"the step without communication, {ms(lim.compute)}")
        step = f"the same batch's step with communication, {ms(lim.step)}"
        if lim.verdict == "impossible":
            text += (f". {step[0].upper()}{step[1:]}, is shorter than that beyond the pairs' spread (limit / step = "
                     f"{lim.reached_number}): no method beats the limit, so the step timer or the link counters "
                     "measured something else here")
        elif lim.verdict == "at":
            text += f"; {step}, is at the limit within the pairs' spread (limit / step = {lim.reached_number})"
        else:
            text += (f"; {step}, reaches {lim.reached_number} of the limit (limit / step; 1.00 = at the limit), "
                     "beyond the pairs' spread")
        out.append(text + ".")
    return out


def ddp_timer_lines(xs):
    """DDP's own communication timers (its logging data) beside the yardstick, and once how the two differ."""
    out = []
    for x in [x for x in xs if x.kind == "baseline_ddp" and x.stat("ddp_timers.comm")]:
        t = {k: x.mean(f"ddp_timers.{k}") for k in ("comm", "overlap", "exposed", "compute", "forward")}
        overhead = x.mean("yardstick.overhead")
        out.append(f"- DDP's own timers, {x.label}: {ms(t['comm'])} of backward communication per step (first "
                   f"bucket's all-reduce launched to the last one done), {ms(t['overlap'])} of it overlapping "
                   f"backward compute ({ms(t['exposed'])} exposed); backward compute {ms(t['compute'])}, forward "
                   f"{ms(t['forward'])}; " + (f"the yardstick's overhead: {ms(overhead)}." if overhead is not None
                                               else "the yardstick was not measured in this run."))
    if out:
        out.append("- DDP's timers and the yardstick answer different questions: DDP's is how long its "
                   "all-reduces were in flight during backward (sampled iterations), the yardstick what the whole "
                   "step costs more than the same step without communication; an exchange fully hidden behind "
                   "backward costs DDP time but no yardstick time, and waiting that DDP's window does not cover (a "
                   "slow rank, the optimizer's wait) costs yardstick time only.")
    return out


def straggler_lines(xs):
    """Per run that measured each rank's compute: which rank held the others back, and for how long, as the run
    named it (ranks.words: the table's numbers)."""
    out = []
    for x in xs:
        for r in x.runs:
            rc = r.rank_compute
            if rc is None:
                continue
            text = f"- Slow rank, {run_label(x, r)}: {ranks.words(rc)}"
            if rc.stragglers and r.batch_time:
                waited = max(s.cost_per_step for s in rc.stragglers)
                text += f" ({100 * waited / r.batch_time:.0f}% of the epochs' measured step of {ms(r.batch_time)})"
            out.append(text + ".")
    return out


def slow_link_lines(xs):
    """Per run that measured each node's link (epochs[].node_links): the slow link it named and what it cost per
    step, or that no link was slower beyond the noise (links.node_link_words)."""
    out = []
    for x in xs:
        for r in x.runs:
            text = node_link_words(r.epochs)
            if text:
                out.append(f"- Slow link, {run_label(x, r)}: {text}.")
    return out


def convergence_lines(xs):
    """Each experiment's loss curve against the DDP doing the same math, judged against the seed-to-seed
    spread (the noise floor); with one seed the verdict has no floor and says so. A modeled run's loss is a
    proxy's: not compared, said once."""
    out = []
    for x in xs:
        ref = twin_ddp(x, xs) or baseline_for(x, xs)
        if ref is None or ref is x or x.modeled:
            continue
        judged = verdicts.compare_curves(x, ref)
        if judged is None:
            continue
        diff, v = judged
        text = f"- Loss curves: {x.label} vs {ref.label}: the (mean) smoothed curves differ by {diff:.4f} on average"
        same_math = (x.trainers == ref.trainers and x.batch_size == ref.batch_size and not x.compressed
                     and not x.asynchronous)
        if v.within:
            text += f", within the seed-to-seed spread of {v.noise:.4f} (the noise floor): they agree"
        elif v.beyond and x.kind == "all_reduce" and same_math:
            text += (f", {diff / v.noise:.1f}x the seed-to-seed spread of {v.noise:.4f}: RED FLAG, the manual "
                     "all-reduce is the same math as DDP (its tests prove it), so check the run or the method")
        elif v.beyond:
            text += f", {diff / v.noise:.1f}x the seed-to-seed spread of {v.noise:.4f}: beyond the noise floor"
        else:
            agree, n = curves.steps_matching(x.first, ref.first)
            if agree:
                text += f"; step by step the losses match for the first {agree} of {n} steps" + (
                    " (the same math)" if same_math else "")
            text += ("; one seed each, so there is no noise floor to judge the rest against (run_all.sh "
                     "--seeds \"0 1 2\" gives one)")
        if x.trainers != ref.trainers or x.batch_size != ref.batch_size:
            text += " (it trains on a different global batch and data split)"
        if x.mean("best_val_accuracy") is not None and ref.mean("best_val_accuracy") is not None \
                and not x.accuracy_void and not ref.accuracy_void:
            text += (f"; best val accuracy {x.stat('best_val_accuracy').text()}% vs "
                     f"{ref.stat('best_val_accuracy').text()}%")
        out.append(text + ".")
    modeled = [x.label for x in xs if x.modeled]
    if modeled:
        out.append(f"- Loss and accuracy not compared for {', '.join(modeled)}: modeled compute trains a proxy "
                   "model, so they mean nothing.")
    return out


def ps_lines(xs):
    """The single server's bottleneck, argued from the mode and the measurements."""
    out = []
    for x in [x for x in xs if x.kind == "ps"]:
        w, model_mb = x.trainers, (x.state_bytes or 0) / 1e6
        if not x.single_server:
            text = (f"- Sharded PS ({x.label}): every rank serves 1/{x.world_size} of the parameters, so each link "
                    f"carries about 2(N-1)/N of the {model_mb:.0f} MB model per step, as a ring all-reduce does")
        elif x.comm == "p2p":
            text = (f"- PS bottleneck ({x.label}): a star: every step the server sends the whole {model_mb:.0f} MB "
                    f"state to each of its {w} workers and receives each one's gradients, tensor by tensor, so its "
                    f"link carries {2 * w} model copies per step, while a ring all-reduce rank moves 2(N-1)/N (under 2)")
        elif x.comm is None:
            text = (f"- PS ({x.label}): one server and {w} workers; how the file's script moves the parameters is "
                    "not recorded in it")
        else:
            text = (f"- PS exchange ({x.label}): packed buckets, dist.broadcast from the server and dist.reduce to "
                    "it; how many bytes cross the server's link is the backend's choice, not necessarily one copy per "
                    "worker")
        link = link_figures(x)
        if link and model_mb:
            text += (f"; measured on the {link.rate} links: the busiest node link sent {link.sent / 1e6:.1f} MB and "
                     f"received {link.received / 1e6:.1f} MB per step ({link.busiest / 1e6 / model_mb:.2f}x the "
                     f"model), {ms(link.link_time)} at the link rate")
        elif x.comm not in ("p2p", None):
            text += "; not measured here (no declared link: run it on emulate_cluster.sh to count the bytes)"
        if x.mean("comm_pull") is not None and x.mean("comm_push") is not None:
            text += (f"; workers wait {ms(x.mean('comm_pull'))} to pull and {ms(x.mean('comm_push'))} to push per "
                     "step (the script's own timers)")
        if x.mean("server_update") is not None and not x.asynchronous:
            text += f", and {ms(x.mean('server_update'))} per step for the server to aggregate and update while every worker waits"
        out.append(text + ".")
    for x in [x for x in xs if x.kind == "ps" and x.comm not in ("p2p", None)]:
        p2p = next((p for p in xs if p.kind == "ps" and p.variant == "p2p" and p.world_size == x.world_size
                    and same_compute(p, x)), None)
        if p2p is None or x.mean("yardstick.overhead") is None or p2p.mean("yardstick.overhead") is None:
            continue
        v, ratio = verdicts.compare_overhead(x, p2p), verdicts.overhead_ratio(x, p2p)
        how = f"is {ratio:.2f}x the guide's per-tensor p2p" if ratio is not None else "set against the guide's p2p"
        out.append(f"- PS at {x.world_size} processes: {x.variant} communication overhead {how} "
                   f"({verdicts.overhead_text(x)} vs {verdicts.overhead_text(p2p)}; {v.words}).")
    return out


def link_lines(xs):
    out = []
    for x in xs:
        link, overhead = link_figures(x), x.mean("yardstick.overhead")
        if link is None or overhead is None:
            continue
        text = (f"- Link bound, {x.label}: the busiest link carried {link.sent / 1e6:.1f} MB out and "
                f"{link.received / 1e6:.1f} MB in per step, {ms(link.link_time)} at {link.rate} "
                f"({link.link_time_how}), the least time those bytes take; the measured overhead, ")
        if verdicts.overhead_near_zero(x):
            text += f"{verdicts.overhead_text(x)}, is below it: the exchange runs during compute"
        else:
            text += f"{ms(overhead)}, is {overhead / link.link_time:.2f}x that bound"
        if overhead < link.link_time and not verdicts.overhead_near_zero(x):
            text += " (below it: part of the exchange runs during compute)"
        if link.bound_bytes:
            text += (f"; the method cannot move less than {link.bound_bytes / 1e6:.1f} MB per direction there "
                     f"({link.bound_how}): measured {link.busiest / link.bound_bytes:.2f}x that")
        out.append(text + ".")
    return out


def hierarchy_lines(xs):
    """On several processes per node: a flat ring's bytes per node link beside the two-level all-reduce's, and
    which the row used, against what its busiest link carried (the link table's figures)."""
    out = []
    for x in xs:
        f = link_figures(x)
        if f is None or f.pattern is None or f.ring_bytes is None or not several_per_node(x):
            continue
        m, n = x.network.get("nodes"), x.world_size
        text = (f"- Flat ring vs two-level, {x.label}: on {m} nodes x {x.network['procs_per_node']} processes a flat "
                f"ring moves 2(N-1)/N = {2 * (n - 1) / n:.2f}x the {x.wire_bytes / 1e6:.1f} MB of gradients through "
                f"each node link ({f.ring_bytes / 1e6:.1f} MB per direction), the two-level all-reduce 2(M-1)/M = "
                f"{2 * (m - 1) / m:.2f}x ({f.two_level_bytes / 1e6:.1f} MB); ")
        if f.pattern in ("flat ring", "two-level"):
            expected = f.ring_bytes if f.pattern == "flat ring" else f.two_level_bytes
            text += (f"this run used the {f.pattern} pattern and its busiest link carried {f.busiest / 1e6:.1f} MB "
                     f"per direction ({f.busiest / expected:.2f}x the {f.pattern}'s)")
        else:
            text += (f"this run used {f.pattern} (ring or tree); its busiest link carried {f.busiest / 1e6:.1f} MB "
                     f"per direction ({f.busiest / f.ring_bytes:.2f}x the flat ring's, "
                     f"{f.busiest / f.two_level_bytes:.2f}x the two-level's)")
        out.append(text + ".")
    return out


def cluster_lines(xs):
    """Per method and variant run at several node counts: how its communication per step grew from the smallest
    to the largest cluster against its link-rate bound (the scaling_cluster.png figures)."""
    out = []
    for key, group in cluster_groups(xs).items():
        points = [p for p in cluster_points(group) if p["overhead"] is not None]
        if len(points) < 2:
            continue
        a, b = points[0], points[-1]
        growth = verdicts.ratio(b["overhead"], a["overhead"])
        text = (f"- Cost against nodes, {cluster_name(key)}: communication overhead {ms(a['overhead'])} per step at "
                f"{a['nodes']} nodes -> {ms(b['overhead'])} at {b['nodes']}"
                + (f" ({growth:.2f}x)" if growth is not None else ""))
        if a["bound"] and b["bound"]:
            text += (f"; its link-rate bound ({b['how']}) {ms(a['bound'])} -> {ms(b['bound'])} "
                     f"({b['bound'] / a['bound']:.2f}x)")
            if growth is not None:
                text += (f", so the overhead went from {a['overhead'] / a['bound']:.2f}x to "
                         f"{b['overhead'] / b['bound']:.2f}x its bound")
        else:
            text += "; no per-step link bound for it"
        if a["bytes"] is not None and b["bytes"] is not None:
            text += (f"; the busiest node link carried {a['bytes'] / 1e6:.1f} -> {b['bytes'] / 1e6:.1f} MB per step "
                     "(per direction)")
        out.append(text + ".")
    return out


def restart_lines(xs):
    """Per run: the restarts it survived and what its checkpoints cost (recovery.words: the table's numbers)."""
    return [f"- Restarts and checkpoints, {run_label(x, r)}: {recovery.words(r.recovery)}."
            for x in xs for r in x.runs if r.recovery.anything]


def tradeoff_lines(xs):
    """Did compression or asynchrony pay off on this link: speed and accuracy against the plain variant."""
    out = []
    for x in xs:
        p = plain_variant(x, xs)
        if p is None:
            continue
        speed = verdicts.compare_throughput(x, p)
        text = f"- {x.label} against {p.label}: {speed.ratio:.2f}x the throughput ({speed.words})"
        if x.mean("yardstick.overhead") is not None and p.mean("yardstick.overhead") is not None:
            ov, ratio = verdicts.compare_overhead(x, p), verdicts.overhead_ratio(x, p)
            change = f"{100 * (ratio - 1):+.0f}%, " if ratio is not None else ""
            text += (f", communication overhead {verdicts.overhead_text(x)} vs {verdicts.overhead_text(p)} "
                     f"({change}{ov.words})")
            if speed.beyond is None:  # no noise measure for the throughput: the yardstick judges the speed
                speed = compare(-ov.a, -ov.b, ov.noise, ov.measure)
        if x.asynchronous:
            text += (f", staleness {x.mean('staleness_mean'):.2f} updates on average "
                     f"(max {x.mean('staleness_max'):.0f})")
        accuracy = None
        if not x.accuracy_void and not p.accuracy_void and x.mean("final_val_accuracy") is not None \
                and p.mean("final_val_accuracy") is not None:
            accuracy = verdicts.compare_accuracy(x, p)
            text += (f"; final val accuracy {accuracy.a:.2f}% vs {accuracy.b:.2f}% (" +
                     (accuracy.words if accuracy.beyond is not None else "one seed: no noise floor") + ")")
        elif not x.modeled and x.mean("final_train_loss") is not None and p.mean("final_train_loss") is not None:
            text += f"; final train loss {x.mean('final_train_loss'):.4f} vs {p.mean('final_train_loss'):.4f}"
        if speed.beyond is None:
            verdict = "has no noise measure to be judged by"
        elif not speed.beyond:
            verdict = "made no difference beyond noise"
        elif speed.diff < 0:
            verdict = "did not pay off"
        elif accuracy is not None and accuracy.beyond and accuracy.diff < 0:
            verdict = "bought speed at an accuracy cost"
        else:
            verdict = "paid off" + ("" if accuracy is None or accuracy.beyond is not None
                                    else " in speed (its accuracy cost is not judged: one seed)")
        out.append(text + f": on this link it {verdict}.")
    return out


def scaling_lines(xs):
    out = []
    for (kind, variant, model), group in scaling_groups(xs).items():
        a, b = group[0], group[-1]
        ta, tb = a.mean("throughput"), b.mean("throughput")
        eff = tb / (ta * b.trainers / a.trainers)
        out.append(f"- Scaling {KINDS[kind][0]} ({variant or 'guide file'}{', modeled compute' if model else ''}): {ta:.1f} img/s at {a.world_size} "
                   f"processes -> {tb:.1f} at {b.world_size} ({100 * eff:.0f}% of linear in trainers).")
    return out


def note_lines(xs):
    out = []
    if any(x.kind == "ps" and x.trainers < x.world_size for x in xs):
        out.append("- Note: a single-server PS trains on world_size - 1 processes, so its global batch is "
                   "num_workers x batch (see Trainers x batch): compare its curves with the DDP of as many trainers.")
    for x in xs:
        for r in x.runs:
            if not r.complete:
                out.append(f"- {x.label}: {r.path.name} has status {r.status!r} with {len(r.epochs)} "
                           "epoch(s) recorded; its numbers cover only those epochs.")
    return out


ANALYSIS_GROUPS = (
    ("Speed", (time_lines, throughput_lines, ranking_lines, mixed_compute_lines, tradeoff_lines)),
    ("Communication", (overhead_lines, limit_lines, ddp_timer_lines, ps_lines, link_lines, hierarchy_lines)),
    ("Convergence", (convergence_lines,)),
    ("Scale", (scaling_lines, cluster_lines)),
    ("Ranks and restarts", (straggler_lines, slow_link_lines, restart_lines)),
    ("Notes", (note_lines,)),
)


def analysis_groups(xs):
    """[(group, lines)]: observations computed from the numbers, grouped; nothing here is asserted without a
    figure behind it. Groups with nothing to say are left out."""
    groups = [(title, [line for f in functions for line in f(xs)]) for title, functions in ANALYSIS_GROUPS]
    return [(title, lines) for title, lines in groups if lines]


def analysis(xs):
    """Every observation, in group order."""
    return [line for _, lines in analysis_groups(xs) for line in lines]


def not_measured_lines(xs):
    """Each set of figures some runs lack, named once, with the files that lack it."""
    groups = {}
    for x in xs:
        for r in x.runs:
            missing = r.not_measured() + ([f"status ({r.completion_note})"] if r.completion_note else [])
            if missing:
                groups.setdefault(tuple(missing), []).append(r.path.name + (" (guide format)" if r.guide_format
                                                                            else ""))
    return [f"- {', '.join(files)}: {', '.join(missing)}" for missing, files in groups.items()]


# --------------------------------------------------------------------------- the whole report
def wrap(line, width=WIDTH):
    """A logical line within `width` columns: continuation lines indented two more than its first."""
    if len(line) <= width:
        return line
    return fill(line, width, " " * (len(line) - len(line.lstrip()) + 2))


def tables_text(tables):
    """The Details tables as the terminal and the report show them: grouped, each under its title and caption."""
    out, group = [], None
    for t in tables:
        if t.group != group:
            group = t.group
            out.append(f"[{group}]" if group else "")
        out += [render_text(t), ""]
    return "\n".join(out).rstrip()


def summary_line(xs):
    """One line of what ran, from the fields every run shares."""
    first = xs[0].first.data
    same = lambda key: len({str(x.first.data.get(key)) for x in xs}) == 1 and first.get(key) is not None  # noqa
    parts = [f"{sum(len(x.runs) for x in xs)} results files, {len(xs)} experiments"]
    if same("arch"):
        parts.append(str(first["arch"]) + (f" at {first['image_size']} px" if same("image_size") else ""))
    if isinstance(first.get("dataset"), dict) and same("dataset"):
        parts.append(f"on {first['dataset'].get('name')}")
    if same("backend") and same("device"):
        parts.append(f"{first['backend']} on {first['device']}")
    if all(not x.network for x in xs) and not all(x.guide_format for x in xs):
        parts.append("loopback")
    if any(x.modeled for x in xs):
        parts.append("modeled compute in " + ", ".join(x.label for x in xs if x.modeled))
    return "Runs: " + "; ".join(parts) + " (the full context is under Details)."


def answer_text(xs):
    """The first page: the guide's answer."""
    return "\n".join(wrap(line) for line in "\n".join(answer_lines(xs)).split("\n")).rstrip()


def build_report(xs, skipped, tables, plots):
    """performance_report.txt's text: the guide's answer, then the Details."""
    lines = [f"Distributed training performance report ({time.strftime('%Y-%m-%d %H:%M:%S')})", summary_line(xs),
             "", answer_text(xs), "", "=" * 24,
             f"Details: every run and variant, grouped; what each column means: {DOCS}", "", tables_text(tables), "",
             "Analysis (computed from the numbers above)"]
    for title, group in analysis_groups(xs):
        lines += [f"[{title}]", *group]
    lines += ["", "Run context", *context_lines(xs),
              "  files: " + ", ".join(r.path.name for x in xs for r in x.runs), ""]
    if skipped:
        lines += [f"Skipped files: {len(skipped)} JSON file(s) in the folder are not usable results, one line each",
                  *(f"  - {s}" for s in skipped), ""]
    missing = not_measured_lines(xs)
    if missing:
        lines += ["Not measured by these runs (shown as - in the tables; never filled in from a default)", *missing,
                  ""]
    lines.append("Plots: " + ", ".join(f"plots/{name}" for name in sorted(plots)))
    return "\n".join(wrap(line) for line in "\n".join(lines).split("\n")) + "\n"
