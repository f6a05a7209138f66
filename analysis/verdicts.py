"""The judgements the tables and the report share: each is computed once here, from stats.compare, so a table
cell and the sentence about the same figure show the same number with the same verdict."""
import dataclasses

from . import curves
from .stats import compare, ms, number, two_sigma


# --------------------------------------------------------------------------- throughput
def throughput_noise(x):
    """(standard deviation-like noise of the experiment's throughput, its source) or (None, None): the spread
    over seeds with two or more; else the standard error of one run's mean from its steps' spread
    (step_time_stdev); else no noise measure."""
    est = x.stat("throughput")
    if est is not None and est.sd is not None:
        return est.sd, "seeds"
    se = x.stat("throughput_se")
    if se is not None and se.n == len(x.runs) == 1:
        return se.mean, "steps"
    return None, None


def compare_throughput(a, b):
    """a's mean throughput against b's, judged against twice their combined noise (the seed spread, or the
    standard error of the mean step time from step_time_stdev: 2 sigma of the difference)."""
    (na, sa), (nb, sb) = throughput_noise(a), throughput_noise(b)
    known = [n for n in (na, nb) if n is not None]
    noise = two_sigma(*known) if known else None
    sources = {s for s in (sa, sb) if s}
    what = {frozenset({"seeds"}): "the seed-to-seed spread",
            frozenset({"steps"}): "the step-to-step noise (2 standard errors of the mean step)",
            frozenset({"seeds", "steps"}): "the seed spread and the step-to-step noise"}.get(frozenset(sources), "")
    measure = f"{what}, ±{noise:.1f} img/s" if noise is not None else ""
    return compare(a.mean("throughput"), b.mean("throughput"), noise, measure)


# --------------------------------------------------------------------------- the yardstick
def overhead_range(x):
    """The yardstick's min-max over its pairs (means over seeds), or None."""
    lo, hi = x.mean("yardstick.overhead_min"), x.mean("yardstick.overhead_max")
    return None if lo is None else (lo, hi)


SE_MIN_PAIRS = 3  # fewer pairs give no usable standard error: the min-max rule stays


def overhead_se(x):
    """The standard error of the experiment's yardstick median (from the pairs' own spread; the mean over seeds),
    or None where a run lacks it (older files) or measured fewer than SE_MIN_PAIRS pairs."""
    ys = [r.yardstick for r in x.runs]
    if not all(y and y.overhead_se is not None and (y.pairs or 0) >= SE_MIN_PAIRS for y in ys):
        return None
    return x.mean("yardstick.overhead_se")


def compare_overhead(a, b):
    """a's communication overhead against b's: judged against twice the combined standard error of the two medians
    where both yardsticks record it over SE_MIN_PAIRS pairs or more, else against the larger of their pairs'
    spreads (max - min), which grows with the pairs instead of shrinking."""
    sa, sb = overhead_se(a), overhead_se(b)
    if sa is not None and sb is not None:
        noise = two_sigma(sa, sb)
        return compare(a.mean("yardstick.overhead"), b.mean("yardstick.overhead"), noise,
                       f"2 standard errors of the pairs' medians, {ms(noise)}")
    (alo, ahi), (blo, bhi) = overhead_range(a), overhead_range(b)
    noise = max(ahi - alo, bhi - blo)
    return compare(a.mean("yardstick.overhead"), b.mean("yardstick.overhead"), noise,
                   f"the pairs' spread, {ms(noise)}")


def overhead_near_zero(x):
    """The overhead's spread over the pairs includes 0: no communication cost measurable."""
    lo, hi = overhead_range(x)
    return lo <= 0 <= hi


@dataclasses.dataclass(frozen=True)
class Hidden:
    """How much of the exchange the overlap hides behind backward: the table's cell and the report's words."""
    cell: str
    words: str


def hidden(x):
    """The overlapped overhead against the same buckets exchanged blocking after backward (both measured in
    the same pairs); None for a method without that measurement. A share is printed only when the difference is
    beyond the pairs' spreads and the share is between 0 and 100%."""
    blocking = x.mean("yardstick.blocking")
    if blocking is None:
        return None
    overhead = x.mean("yardstick.overhead")
    lo, hi = overhead_range(x)
    blo, bhi = x.mean("yardstick.blocking_min"), x.mean("yardstick.blocking_max")
    head = f"the same buckets exchanged blocking after backward cost {ms(blocking)}"
    if blo is not None and blo <= 0:
        return Hidden("n/a (nothing to hide)", f"{head}, within noise of zero: there is no communication here to hide")
    v = compare(overhead, blocking, max(hi - lo, (bhi - blo) if blo is not None else 0.0), "the pairs' spread")
    if v.within:
        return Hidden("within noise", f"{head}, the same as overlapped within noise (spread {ms(v.noise)}): no "
                                      "measurable share is hidden here")
    if overhead > blocking:
        return Hidden("none (overlap costs more)", f"{head}, less than overlapped, beyond noise (spread "
                                                   f"{ms(v.noise)}): nothing is hidden, the overlap costs more here")
    if lo <= 0:
        return Hidden("all (overhead within noise of 0)", f"{head}; overlapped, the overhead is within noise of "
                                                          "zero: the whole exchange is hidden behind backward")
    share = 1 - overhead / blocking
    return Hidden(number(share, 0, 100), f"{head}, so {100 * share:.0f}% is hidden behind backward (beyond the pairs' "
                                         f"spread of {ms(v.noise)}; both measured in this run)")


# --------------------------------------------------------------------------- accuracy
def compare_accuracy(a, b):
    """a's final val accuracy against b's, judged against twice the seed spread (None: one seed each)."""
    sds = [s.sd for s in (a.stat("final_val_accuracy"), b.stat("final_val_accuracy")) if s and s.sd is not None]
    noise = two_sigma(*sds) if sds else None
    return compare(a.mean("final_val_accuracy"), b.mean("final_val_accuracy"), noise,
                   f"the seed spread, ±{noise:.2f} points" if noise is not None else "")


# --------------------------------------------------------------------------- ratios that mean something
def ratio(a, b):
    """a / b, or None unless both are positive: a ratio across a sign change (or of a figure within noise of zero)
    reads as nonsense."""
    return a / b if a is not None and b is not None and a > 0 and b > 0 else None


def overhead_ratio(a, b):
    """a's overhead / b's, or None where either is within noise of zero (or not positive)."""
    if overhead_near_zero(a) or overhead_near_zero(b):
        return None
    return ratio(a.mean("yardstick.overhead"), b.mean("yardstick.overhead"))


def overhead_text(x):
    """The overhead as words: "68.1 ms", or "within noise of 0 (-10.9 ms)"."""
    overhead = x.mean("yardstick.overhead")
    return f"within noise of 0 ({ms(overhead)})" if overhead_near_zero(x) else ms(overhead)


def compare_by_seeds(a, b, figure, unit, digits=2, scale=1.0):
    """a's figure against b's, judged against twice their combined seed spread (no verdict with one seed each);
    the measure's words carry the noise in `unit`."""
    sds = [s.sd for s in (a.stat(figure), b.stat(figure)) if s and s.sd is not None]
    noise = two_sigma(*sds) if sds else None
    return compare(a.mean(figure) * scale, b.mean(figure) * scale, None if noise is None else noise * scale,
                   f"the seed spread, ±{noise * scale:.{digits}f}{unit}" if noise is not None else "")


# --------------------------------------------------------------------------- loss curves
def compare_curves(x, ref):
    """(mean gap between the two experiments' smoothed loss curves, its Verdict against the seed-to-seed spread,
    the noise floor; no verdict with one seed each), or None where a curve is missing."""
    if any(r.losses is None for r in x.runs + ref.runs):
        return None
    grid = curves.common_grid(x, ref)
    if grid is None:
        return None
    diff = curves.mean_gap(grid, x, ref)
    floors = [f for f in (curves.seed_floor(x, grid), curves.seed_floor(ref, grid)) if f is not None]
    return diff, compare(diff, 0.0, max(floors) if floors else None, "the seed-to-seed spread")
