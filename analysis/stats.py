"""Statistics and the one rule for "is this difference inside the noise?".

An Estimate is a figure over an experiment's seeds (mean, and the standard deviation with two or more). A Verdict
is a against b judged against a noise measure: `compare(a, b, noise, measure)`; every table cell and every
sentence that judges a difference takes its words from one (beyond / within / no noise measure).
"""
import dataclasses
import math
import statistics


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A figure over seeds: its mean, and its standard deviation over seeds (None with one seed)."""
    values: tuple

    @property
    def n(self):
        return len(self.values)

    @property
    def mean(self):
        return statistics.mean(self.values)

    @property
    def sd(self):
        return statistics.stdev(self.values) if self.n > 1 else None

    def text(self, digits=2, scale=1.0):
        """"204.8", or "204.8 ± 28.0" (± the spread over seeds)."""
        return number(self.mean, digits, scale) + ("" if self.sd is None else f" ± {self.sd * scale:.{digits}f}")


def estimate(values):
    """An Estimate of the values, or None without any."""
    return Estimate(tuple(float(v) for v in values)) if values else None


@dataclasses.dataclass(frozen=True)
class Verdict:
    """a against b, judged against a noise measure: beyond it when |a - b| > noise; no verdict (beyond is None)
    when there is no noise measure."""
    a: float
    b: float
    noise: float = None
    measure: str = "the noise"  # what the noise is, in words: "the pairs' spread, 13.9 ms"

    @property
    def diff(self):
        return self.a - self.b

    @property
    def ratio(self):
        return self.a / self.b if self.b else None

    @property
    def beyond(self):
        return None if self.noise is None else abs(self.diff) > self.noise

    @property
    def within(self):
        return self.beyond is False

    @property
    def words(self):
        """"beyond <measure>", "within <measure>" or "no noise measure"."""
        if self.beyond is None:
            return "no noise measure"
        return f"{'beyond' if self.beyond else 'within'} {self.measure}"


def compare(a, b, noise, measure="the noise"):
    """The Verdict on a against b (noise None: there is no noise measure)."""
    return Verdict(float(a), float(b), None if noise is None else float(noise), measure)


def two_sigma(*sds):
    """The noise of a difference of independent figures: twice their combined standard deviation (None when
    any is missing)."""
    return None if not sds or any(s is None for s in sds) else 2 * math.hypot(*sds)


# --------------------------------------------------------------------------- the way numbers are written
def number(value, digits=2, scale=1.0):
    """A figure as a table cell: "-" when it was not measured."""
    return "-" if value is None else f"{value * scale:.{digits}f}"


def ms(seconds, digits=1):
    return "-" if seconds is None else f"{1e3 * seconds:.{digits}f} ms"


def pct(share, digits=1):
    return "-" if share is None else f"{100 * share:.{digits}f}%"
