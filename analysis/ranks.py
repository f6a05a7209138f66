"""Which rank held the others back: each trainer's own compute per step (epochs[].rank_compute), and the straggler
the training side named in it.

A synchronous method waits for its slowest rank every step, and its communication timers cannot show which one it
was (in DDP every rank sees the same long all-reduce). Each rank's compute (forward + backward, no waiting for the
others) can: the training side writes it per epoch with the median over the ranks, and names a straggler by one
rule (measure.py: the slowest rank, when its compute exceeds the median of the others' beyond a floor and beyond
their step-to-step noise; `ratio` = its compute / the others' median, `cost_per_step` = its compute minus the
others' median, what they waited for it each step). This module only reads and summarises that; it never names
a straggler itself, so the report says exactly what the run measured.
"""
import dataclasses
import math
import statistics


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class Straggler:
    """One rank named slow in some epochs: the means over those epochs (seconds per step) of its compute, of what
    it was compared with (the others' median: its compute - cost_per_step), of its ratio and of its cost."""
    rank: int
    epochs: tuple
    compute: float
    others: float
    ratio: float
    cost_per_step: float


@dataclasses.dataclass(frozen=True)
class RankCompute:
    """A run's per-rank compute: per rank the mean over the epochs that record it (seconds per step), the mean of
    the epochs' medians, the timed steps behind them, and the stragglers named in them."""
    epochs: tuple  # the epoch numbers with a record
    ranks: tuple
    compute: tuple  # per rank, in the order of ranks
    stdev: tuple  # per rank (None where an epoch lacks it): the mean over epochs of its step-to-step stdev
    median: float
    steps: int
    stragglers: tuple  # Straggler, by rank

    @property
    def slowest(self):
        """(rank, its compute / the median of the others' computes) of the rank with the largest mean compute; the
        ratio is None with one rank."""
        i = max(range(len(self.ranks)), key=lambda k: self.compute[k])
        others = [c for k, c in enumerate(self.compute) if k != i]
        return self.ranks[i], self.compute[i] / statistics.median(others) if others else None


def _record(e):
    """The epoch's rank_compute record if it is usable: ranks and compute of one length, numbers."""
    r = e.get("rank_compute")
    if not isinstance(r, dict):
        return None
    ranks, compute = r.get("ranks"), r.get("compute")
    if not (isinstance(ranks, list) and isinstance(compute, list) and ranks and len(ranks) == len(compute)
            and all(isinstance(k, int) for k in ranks) and all(_number(c) for c in compute)):
        return None
    return r


def read(epochs):
    """The RankCompute of a run's epochs, or None when no epoch records a usable rank_compute."""
    records = [(e["epoch"], r) for e in epochs for r in [_record(e)] if r is not None]
    if not records:
        return None
    ranks = tuple(sorted({k for _, r in records for k in r["ranks"]}))
    per_rank = {k: [] for k in ranks}
    noise = {k: [] for k in ranks}
    for _, r in records:
        stdev = r.get("stdev") if isinstance(r.get("stdev"), list) and len(r["stdev"]) == len(r["ranks"]) else None
        for i, k in enumerate(r["ranks"]):
            per_rank[k].append(float(r["compute"][i]))
            noise[k].append(float(stdev[i]) if stdev is not None and _number(stdev[i]) else None)
    medians = [float(r["median"]) if _number(r.get("median")) else statistics.median(r["compute"])
               for _, r in records]
    named = {}
    for (epoch, r), median in zip(records, medians):
        s = r.get("straggler")
        if isinstance(s, dict) and s.get("rank") in r["ranks"]:
            named.setdefault(s["rank"], []).append((epoch, s, r, median))
    stragglers = []
    for rank, hits in sorted(named.items()):
        figures = [_straggler_figures(s, r, m) for _, s, r, m in hits]
        stragglers.append(Straggler(rank, tuple(ep for ep, *_ in hits),
                                    *(statistics.mean(f[i] for f in figures) for i in range(4))))
    steps = sum(int(r["steps"]) for _, r in records if isinstance(r.get("steps"), int))
    return RankCompute(epochs=tuple(ep for ep, _ in records), ranks=ranks,
                       compute=tuple(statistics.mean(per_rank[k]) for k in ranks),
                       stdev=tuple(None if None in noise[k] else statistics.mean(noise[k]) for k in ranks),
                       median=statistics.mean(medians), steps=steps, stragglers=tuple(stragglers))


def _straggler_figures(s, record, median):
    """(compute, the others' median, ratio, cost per step) of one epoch's straggler record, each as written, or
    from the others where one is missing."""
    compute = float(s["compute"]) if _number(s.get("compute")) else \
        float(record["compute"][record["ranks"].index(s["rank"])])
    if _number(s.get("cost_per_step")):
        others = compute - float(s["cost_per_step"])
    elif _number(s.get("ratio")) and s["ratio"]:
        others = compute / float(s["ratio"])
    else:
        rest = [c for k, c in zip(record["ranks"], record["compute"]) if k != s["rank"]]
        others = float(statistics.median(rest)) if rest else median
    ratio = float(s["ratio"]) if _number(s.get("ratio")) else (compute / others if others else float("nan"))
    cost = float(s["cost_per_step"]) if _number(s.get("cost_per_step")) else compute - others
    return compute, others, ratio, cost


def epochs_text(epochs):
    """"epoch 2", "epochs 1-3", "epochs 1, 3"."""
    epochs = sorted(epochs)
    if len(epochs) == 1:
        return f"epoch {epochs[0]}"
    if epochs == list(range(epochs[0], epochs[-1] + 1)):
        return f"epochs {epochs[0]}-{epochs[-1]}"
    return "epochs " + ", ".join(map(str, epochs))


def slowest_cell(rc):
    """The table's "Slowest rank (x others' median)" cell: each straggler with its ratio and epochs, or the
    slowest rank's ratio, "not a straggler"."""
    if rc.stragglers:
        return "; ".join(f"rank {s.rank}: {s.ratio:.2f}x ({epochs_text(s.epochs)})" for s in rc.stragglers)
    rank, ratio = rc.slowest
    return f"rank {rank}: {ratio:.2f}x (not a straggler)" if ratio is not None else "-"


def words(rc):
    """What the run measured, in words: who held the others back and for how long, or that no rank did."""
    if rc.stragglers:
        return "; ".join(
            f"rank {s.rank} computed {s.ratio:.2f}x the others' median ({1e3 * s.compute:.0f} ms vs "
            f"{1e3 * s.others:.0f} ms per step) in {epochs_text(s.epochs)}; the others waited "
            f"~{1e3 * s.cost_per_step:.0f} ms per step for it" for s in rc.stragglers)
    rank, ratio = rc.slowest
    if ratio is None:
        return f"one rank only (rank {rank}): no other to wait for it"
    return (f"no rank was slower than the others beyond the noise in {epochs_text(rc.epochs)} (the slowest, rank "
            f"{rank}, computed {ratio:.2f}x the others' median, over {len(rc.ranks)} ranks; the median compute "
            f"{1e3 * rc.median:.0f} ms per step)")
