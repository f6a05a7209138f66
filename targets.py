"""Time to a target accuracy, from a run's per-epoch figures: the one definition the training side records
(results JSON `time_to_target`) and the analysis computes for files without that record. No torch here.

The run is validated once per epoch, so a target is reached at the end of the first epoch whose validation accuracy
is at or above it: its seconds are the training time of the epochs up to and including that one (the sum of their
`train_time`), its steps their training steps.
"""

DEFINITION = (
    "time to target: the first epoch whose validation accuracy (percent, over the whole val set) is at or above "
    "`target`; seconds = the sum of the epochs' train_time up to and including it (wall-clock training time of the "
    "slowest trainer: data loading, warm-up steps and in-epoch --checkpoint-every writes counted; validation, "
    "epoch-end checkpoints, the yardstick, start-up and a restart's lost time excluded); steps = the training steps "
    "of those epochs. Validation runs once per epoch, so the resolution is one epoch. stopped: the run ended there "
    "because of --target-accuracy.")


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def reach(epochs, target, steps_per_epoch=None):
    """{"epoch", "steps", "seconds", "val_accuracy"} where the epochs (the results JSON's records) first reach
    `target` percent validation accuracy, or None when none does. steps is None where an epoch records no `steps`
    and `steps_per_epoch` is not known (the guide's own files)."""
    seconds, steps = 0.0, 0
    for e in epochs:
        if not _number(e.get("train_time")):
            return None
        seconds += float(e["train_time"])
        n = e.get("steps", steps_per_epoch)
        steps = steps + n if steps is not None and _number(n) else None
        if _number(e.get("val_accuracy")) and e["val_accuracy"] >= target:
            return {"epoch": e["epoch"], "steps": steps, "seconds": seconds, "val_accuracy": float(e["val_accuracy"])}
    return None


def record(epochs, target, stopped=False, steps_per_epoch=None):
    """The results JSON's `time_to_target` block: the target (None without --target-accuracy), whether and where
    it was reached, whether the run stopped there, and the definition."""
    hit = reach(epochs, target, steps_per_epoch) if target is not None else None
    return {"target": target, "reached": None if target is None else hit is not None,
            **(hit or dict.fromkeys(("epoch", "steps", "seconds", "val_accuracy"))),
            "stopped": bool(stopped and hit), "definition": DEFINITION}
