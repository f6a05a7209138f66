"""Time to a target accuracy: which method reaches it first, and by how much.

Per run, the training seconds (validation excluded) and steps until its validation accuracy first reached the
target: its `time_to_target` record where it holds that target, else computed the same way from its epochs
(targets.reach: older kit files and the guide's own, whose steps are unknown). The targets: those the runs were
given (--target-accuracy), the highest accuracy every compared run reached, and the round values below it. Per
experiment the mean and spread over its seeds; a difference is judged against twice the seeds' combined spread
(stats.two_sigma), with one seed each it is not judged. Runs whose accuracy means nothing (modeled compute,
--synthetic) are left out and named; so are runs without a validation accuracy.
"""
import dataclasses
import math

import targets

from .stats import compare, estimate, two_sigma

ROUND_STEP = 10  # round targets: multiples of this many points below the highest every run reached
ROUND_COUNT = 2


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def val_curve(run):
    """[(epoch, cumulative training seconds, cumulative steps or None, val accuracy)] of a run's validated epochs."""
    out, seconds, steps = [], 0.0, 0
    for e in run.epochs:
        seconds += float(e["train_time"])
        n = e.get("steps", run.data.get("steps_per_epoch"))
        steps = steps + n if steps is not None and _number(n) else None
        if _number(e.get("val_accuracy")):
            out.append((e["epoch"], seconds, steps, float(e["val_accuracy"])))
    return out


def recorded_target(run):
    """The --target-accuracy the run was given, or None."""
    block = run.data.get("time_to_target")
    return float(block["target"]) if isinstance(block, dict) and _number(block.get("target")) else None


def run_reach(run, target):
    """{"epoch", "steps", "seconds", "val_accuracy", "source"} where the run first reached `target`, or None."""
    block = run.data.get("time_to_target")
    if recorded_target(run) == target and block.get("reached") and _number(block.get("seconds")):
        return {**{k: block.get(k) for k in ("epoch", "steps", "seconds", "val_accuracy")}, "source": "record"}
    hit = targets.reach(run.epochs, target, run.data.get("steps_per_epoch"))
    return {**hit, "source": "epochs"} if hit else None


def has_accuracy(x):
    """Whether the experiment's validation accuracy means something and was recorded."""
    return not x.accuracy_void and all(val_curve(r) for r in x.runs)


def split(xs):
    """(compared: meaningful validation accuracy, void: accuracy meaningless, unmeasured: no val accuracy)."""
    void = [x for x in xs if x.accuracy_void]
    unmeasured = [x for x in xs if not x.accuracy_void and not has_accuracy(x)]
    return [x for x in xs if has_accuracy(x)], void, unmeasured


def choose_targets(xs):
    """The targets to report for the compared experiments, headline first: the given --target-accuracy (the most
    common one), else the highest accuracy every run reached; then the others of those and the round values
    below the highest all reached."""
    compared = split(xs)[0]
    if not compared:
        return []
    common = min(max(p[3] for p in val_curve(r)) for x in compared for r in x.runs)
    given = [t for x in compared for r in x.runs for t in [recorded_target(r)] if t is not None]
    given = sorted(set(given), key=lambda t: (-given.count(t), t))
    top = math.floor(common / ROUND_STEP) * ROUND_STEP
    if top == common:
        top -= ROUND_STEP
    rounds = [float(v) for v in range(top, 0, -ROUND_STEP)][:ROUND_COUNT]
    out = []
    for t in [*given, round(common, 2), *rounds]:
        if all(abs(t - o) > 1e-9 for o in out):
            out.append(t)
    return out


def headline_words(xs, target):
    """Why this target leads: given to the runs, or the highest every compared run reached."""
    given = any(recorded_target(r) == target for x in split(xs)[0] for r in x.runs)
    return "the runs' --target-accuracy" if given else "the highest every run compared reached"


@dataclasses.dataclass
class Reach:
    """An experiment's time to one target: Estimates over the seeds that reached it, and the seeds that did not."""
    x: object
    target: float
    seconds: object  # Estimate (seconds) or None
    steps: object  # Estimate or None (the guide's files record no steps)
    epochs: object  # Estimate
    missed: list  # file names of the runs that never reached it

    @property
    def all_reached(self):
        return self.seconds is not None and not self.missed

    def text(self, digits=1):
        if self.seconds is None:
            return "never"
        return self.seconds.text(digits) + ("" if not self.missed else f" ({len(self.missed)} seed(s) never)")


def reach(x, target):
    """The experiment's Reach of `target`."""
    hits = {r.path.name: run_reach(r, target) for r in x.runs}
    got = [h for h in hits.values() if h]
    steps = [h["steps"] for h in got if h["steps"] is not None]
    return Reach(x, target, estimate([h["seconds"] for h in got]),
                 estimate(steps) if len(steps) == len(got) else None, estimate([h["epoch"] for h in got]),
                 [name for name, h in hits.items() if h is None])


def compare_reach(a, b):
    """a's time to the target against b's (Reach, both reached by every seed), judged against twice their combined
    seed spread; no verdict with one seed on either side."""
    noise = two_sigma(a.seconds.sd, b.seconds.sd)
    return compare(a.seconds.mean, b.seconds.mean, noise,
                   f"the seed spread, ±{noise:.2f} s" if noise is not None else "")


def ranking(xs, target):
    """[Reach] of the compared experiments that every seed of which reached `target`, fastest first, and [Reach] of
    those that did not."""
    got = [reach(x, target) for x in split(xs)[0]]
    done = sorted((g for g in got if g.all_reached), key=lambda g: g.seconds.mean)
    return done, [g for g in got if not g.all_reached]
