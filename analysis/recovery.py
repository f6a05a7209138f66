"""What surviving failures cost a run: its restarts (the top-level `restarts` list a run started with torchrun
--max-restarts writes: each attempt's step resumed from, the last step before the failure, the steps redone and
the seconds lost) and its checkpoints (epochs[].checkpoint_time, seconds writing checkpoints in the epoch, and
epochs[].checkpoints, how many), as a share of the training loop (the epochs' train_time). A run with restarts is
still one run: its epochs and losses are complete; this only says what the failures cost.
"""
import dataclasses
import math


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class Recovery:
    """A run's restarts and checkpoint cost. restarts is None when the file has no `restarts` field (nothing
    recorded), else the list as written; checkpoint_time is None when no epoch records one."""
    restarts: tuple
    checkpoint_time: float
    checkpoints: int  # None when no epoch counts them
    train_time: float  # the training loop: sum of the epochs' train_time

    def total(self, key):
        """(sum over the restarts that record `key`, how many do not)."""
        known = [float(r[key]) for r in self.restarts or () if _number(r.get(key))]
        return sum(known), len(self.restarts or ()) - len(known)

    @property
    def steps_redone(self):
        return self.total("steps_redone")

    @property
    def seconds_lost(self):
        return self.total("seconds_lost")

    @property
    def checkpoint_share(self):
        """Checkpoint time over the training loop's time, or None."""
        if self.checkpoint_time is None or not self.train_time:
            return None
        return self.checkpoint_time / self.train_time

    @property
    def anything(self):
        """Whether the run records a restart or a checkpoint's cost (else the report has nothing to say)."""
        return bool(self.restarts) or self.checkpoint_time is not None


def read(data):
    """The Recovery of a results file's dict."""
    restarts = data.get("restarts")
    restarts = tuple(r for r in restarts if isinstance(r, dict)) if isinstance(restarts, list) else None
    epochs = data["epochs"]
    times = [float(e["checkpoint_time"]) for e in epochs if _number(e.get("checkpoint_time"))]
    counts = [int(e["checkpoints"]) for e in epochs if isinstance(e.get("checkpoints"), int)]
    return Recovery(restarts=restarts, checkpoint_time=sum(times) if times else None,
                    checkpoints=sum(counts) if counts else None,
                    train_time=sum(float(e["train_time"]) for e in epochs))


def restarts_cell(rec):
    return "none recorded" if rec.restarts is None else str(len(rec.restarts))


def total_text(total, digits=0, unit=""):
    """"17", or "17 (+1 not recorded)" when some restarts lack the figure."""
    value, unknown = total
    return f"{value:.{digits}f}{unit}" + (f" (+{unknown} not recorded)" if unknown else "")


def checkpoint_cell(rec):
    """"3.2 s (0.7%)", with the count when the file gives it, or "-"."""
    if rec.checkpoint_time is None:
        return "-"
    count = f", {rec.checkpoints} written" if rec.checkpoints is not None else ""
    return f"{rec.checkpoint_time:.2f} s ({100 * rec.checkpoint_share:.1f}%{count})"


def words(rec):
    """The run's restarts and checkpoint cost in words (empty when it records neither)."""
    parts = []
    if rec.restarts:
        n = len(rec.restarts)
        each = "; ".join(
            f"attempt {r.get('attempt', '?')} at {r.get('time', '?')} resumed from step "
            f"{r.get('resumed_from_step', '?')} after "
            + (f"reaching step {r['last_step_before']}" if r.get("last_step_before") is not None
               else "a step not recorded")
            for r in rec.restarts)
        parts.append(f"{n} restart{'s' if n > 1 else ''} ({each}): {total_text(rec.steps_redone)} steps redone, "
                     f"{total_text(rec.seconds_lost, 1, ' s')} lost; still one run, its epochs and losses complete")
    elif rec.restarts is not None:
        parts.append("no restart")
    if rec.checkpoint_time is not None:
        count = f" ({rec.checkpoints} checkpoints)" if rec.checkpoints is not None else ""
        parts.append(f"writing checkpoints took {rec.checkpoint_time:.2f} s{count} of the {rec.train_time:.1f} s "
                     f"training loop ({100 * rec.checkpoint_share:.1f}%)")
    return "; ".join(parts)
