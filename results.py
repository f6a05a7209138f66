"""The results JSON: the guide's fields plus what the kit measures (docs/results_schema.md), written by one rank,
atomically, after every epoch; and what happens to a results file that is already there.
"""
import dataclasses
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path

import torch

import common
import measure

PREVIOUS = "previous"  # where an earlier run's results file is moved instead of being replaced


def write_json_atomic(path, data):
    """Writes JSON to a temporary file in the same folder, then renames it: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # the last good file stays as it was
        raise


def move_aside(path):
    """Moves an existing results file to <its folder>/previous/<stem>_<its end time>.json, so that no run is ever
    replaced without a word; returns (the new path, what it held) or None when there was nothing to keep."""
    path = Path(path)
    try:
        old = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        old = {}
    ended = old.get("end_time") if isinstance(old, dict) else None
    stamp = (ended or time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime)))
    target = path.parent / PREVIOUS / f"{path.stem}_{stamp.replace(' ', '_').replace(':', '-')}{path.suffix}"
    target.parent.mkdir(exist_ok=True)
    n = 1
    while target.exists():  # two runs that ended in the same second
        target = target.with_name(f"{target.stem.rsplit('.', 1)[0]}.{n}{path.suffix}")
        n += 1
    os.replace(path, target)
    status = old.get("status", "unknown") if isinstance(old, dict) else "unreadable"
    return target, f"a {status} run" + (f" (ended {ended})" if ended else "")


class Results:
    """The results JSON, rewritten atomically after every epoch by the one rank that `writer` names. "status"
    stays "incomplete" until `finish()`, so a crash, a dead rank or Ctrl-C leaves valid JSON with the finished
    epochs. `saved`: the results so far of an interrupted run (from its checkpoint), continued instead of new
    ones. Otherwise a results file already at the path is moved aside first (and said so by the caller)."""

    def __init__(self, path, method, ctx, args, info, *, writer, saved=None):
        self.path, self.writer, self.moved, self.failed = path, writer, None, None
        if saved is not None:
            self.data = {**saved, "status": "incomplete"}
            self.save()
            return
        self.data = {
            "method": method.name, "kind": method.kind, "world_size": ctx.world_size,
            "trainers": len(method.trainers), "batch_size": args.batch_size, **method.settings, **method.fields,
            "start_time": time.strftime("%Y-%m-%d %H:%M:%S"), "end_time": None, "status": "incomplete",
            "seed": args.seed, "dataset": dataclasses.asdict(info), "arch": args.arch, "image_size": info.image_size,
            "steps_per_epoch": info.steps, "device": common.device_name(ctx.device), "backend": ctx.backend,
            "network": measure.network_info(), "torch_version": str(torch.__version__), "host": socket.gethostname(),
            "python": platform.python_version(), "args": vars(args), "epochs": [], "summary": {}, "all_losses": [],
        }
        if args.synthetic:
            self.data["accuracy_note"] = "synthetic data: random images and labels, so accuracy is meaningless"
        if writer:
            self.moved = move_aside(path)
        self.save()

    def update(self, **fields):
        self.data.update(fields)
        self.save()

    def add_epoch(self, record):
        self.data["epochs"].append(record)
        self.data["all_losses"].extend(record["all_losses"])
        self.data["end_time"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.data["summary"] = summarize(self.data["epochs"], self.data["summary"])
        self.save()

    def finish(self):
        """Marks the run complete and writes it; returns the one-line error when that last write failed, else None."""
        self.data["status"] = "complete"
        self.data["end_time"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.save()
        if self.failed is None:
            return None
        kept = self.path if Path(self.path).exists() else "nothing"
        return (f"the results could not be written to {self.path} ({self.failed.strerror or self.failed}); the last "
                f"good file ({kept}) holds fewer epochs than were run (free the disk, or choose another --output)")

    def save(self):
        """Writes the file; a write that fails (full or read-only disk) keeps the last good file, is said once, and
        is tried again at the next save; the run's last save failing is an error (see finish)."""
        if not self.writer:
            return
        try:
            write_json_atomic(self.path, self.data)
        except OSError as e:
            if self.failed is None:
                print(f"warning: results not written: {self.path}: {e.strerror or e}; the last good file is kept "
                      f"and the write is tried again after each epoch", flush=True)
            self.failed = e
            return
        if self.failed is not None:
            print(f"notice: results written again to {self.path}", flush=True)
        self.failed = None


def summarize(epochs, previous=None):
    """The guide's summary fields, plus the mean of every per-epoch `avg_*` figure and scaling efficiency."""
    summary = dict(previous or {})
    summary.update(avg_train_throughput=statistics.mean(e["train_throughput"] for e in epochs),
                   avg_train_time_per_epoch=statistics.mean(e["train_time"] for e in epochs),
                   final_train_accuracy=epochs[-1]["train_accuracy"], final_train_loss=epochs[-1]["train_loss"])
    if "val_accuracy" in epochs[-1]:
        summary.update(best_val_accuracy=max(e["val_accuracy"] for e in epochs),
                       final_val_accuracy=epochs[-1]["val_accuracy"])
    for key in epochs[-1]:
        if (key.startswith("avg_") or key == "scaling_efficiency") and all(
                isinstance(e.get(key), (int, float)) for e in epochs):
            summary[key] = statistics.mean(e[key] for e in epochs)
    return summary
