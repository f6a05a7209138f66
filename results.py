"""The results JSON: the guide's fields plus what the kit measures (docs/results_schema.md), written by one rank,
atomically, after every epoch; what happens to a results file that is already there; --target-accuracy's record
and stop (Target); and the lines the user reads of each epoch's record.
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
import torch.distributed as dist

import common
import measure
import targets
from common import log

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

    def add_run_epoch(self, record, method, args, compute=None):
        """A trainer's epoch of a run (driver.Run): its scaling efficiency against the yardstick, the compute
        model's summary beside it; then added."""
        record.update(measure.scaling_efficiency(record, self.data.get("comm_overhead"), method.trainers, args))
        if compute:
            self.data["compute_model"] = compute.summary()
        self.add_epoch(record)

    def close(self, ctx, rank):
        """The run's end, every rank: the results complete and written, said by `rank` (the writer); when that last
        write failed, the group is left first (every rank at the barrier), then its one error line is raised."""
        unwritten = self.finish()
        if unwritten:
            common.cleanup_distributed(barrier=True)
            raise common.UserError(unwritten)
        log(ctx, f"wrote {self.path}", rank=rank)

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


def for_run(args, ctx, info, method, writer, saved=None):
    """The run's Results, written by rank `writer` (`saved`: an interrupted run's, from its checkpoint); an earlier
    run's file at --output is moved aside, and that said."""
    out = Results(args.output, method, ctx, args, info, writer=ctx.rank == writer, saved=saved)
    if out.moved:
        log(ctx, f"notice: {args.output} held {out.moved[1]}: moved it to {out.moved[0]} (a finished "
                 "run is never replaced)", rank=writer)
    return out


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


class Target:
    """--target-accuracy: after each epoch's validation, whether the run stops, every rank agreeing (the
    writer's accuracy decides, shared in one tiny all-reduce), and the results' time_to_target record (written
    without the flag too, its target null). A resumed run recomputes the record from the epochs it continues."""

    def __init__(self, args, ctx, results, writer, resumed):
        self.goal, self.ctx, self.results, self.writer = args.target_accuracy, ctx, results, writer
        self.reached = False
        if ctx.rank == writer:
            self.update(stopped=False)
        if resumed and self.goal is not None:
            self.reached = self._agree(bool(ctx.rank == writer and results.data["time_to_target"]["reached"]))
            if self.reached and ctx.rank == writer:
                self.update(stopped=True)
                log(ctx, f"target {self.goal:g}% validation accuracy was reached in epoch "
                         f"{results.data['time_to_target']['epoch']} of the run resumed: no epoch is trained",
                    rank=writer)

    def update(self, stopped):
        data = self.results.data
        self.results.update(time_to_target=targets.record(data["epochs"], self.goal, stopped,
                                                          data.get("steps_per_epoch")))

    def _agree(self, mine):
        flag = torch.tensor([float(mine)], dtype=torch.float64, device=self.ctx.device)
        return measure.all_reduce(flag, dist.ReduceOp.MAX).item() > 0

    def check(self, val_accuracy):
        """After an epoch's validation (every rank calls it; the writer's `val_accuracy` decides)."""
        if self.goal is None:
            if self.ctx.rank == self.writer:
                self.update(stopped=False)
            return
        self.reached = self._agree(self.ctx.rank == self.writer and val_accuracy >= self.goal)
        if self.ctx.rank == self.writer:
            self.update(stopped=self.reached)
            if self.reached:
                r = self.results.data["time_to_target"]
                log(self.ctx, f"target {self.goal:g}% reached: val acc {r['val_accuracy']:.2f}% after epoch "
                              f"{r['epoch']}, {r['steps']} steps, {r['seconds']:.1f} s of training (validation "
                              "excluded); stopping here", rank=self.writer)


# --------------------------------------------------------------------------- what the user reads of an epoch
def log_epoch(ctx, record, rank):
    """The epoch's line, and the warnings it calls for: data-bound, a straggler, a slow link (on `rank`)."""
    log(ctx, epoch_line(record), rank=rank)
    warn_if_data_bound(ctx, record, rank=rank)
    straggler = record["rank_compute"]["straggler"]
    if straggler:
        log(ctx, f"straggler: rank {straggler['rank']} computed {straggler['ratio']:.2f}x the others' median "
                 f"per step; the others waited ~{1e3 * straggler['cost_per_step']:.0f} ms per step for it", rank=rank)
    if record["node_links"] and record["node_links"]["slow"]:
        log(ctx, slow_link_line(record["node_links"]["slow"]), rank=rank)


def epoch_line(record):
    """The one-line per-epoch summary; its phases are the method's own."""
    phases = " ".join(f"{k} {1e3 * v:.1f}" for k, v in record["phase_times"].items())
    line = (f"epoch {record['epoch']}: train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.2f}% | "
            f"{record['train_throughput']:.1f} img/s | {record['train_time']:.1f}s | step "
            f"{1e3 * record['avg_batch_time']:.1f}ms ({phases} ms)")
    if "val_accuracy" in record:
        line += f" | val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.2f}%"
    return line


def slow_link_line(slow):
    """The epoch's slow link in one line: its node, its rate against the others', what it cost each step."""
    mb = lambda v: f"{v / 1e6:.2f}"  # noqa: E731
    return (f"slow link: node {slow['node']} moved {mb(slow['bytes_per_step'])} MB per step at {mb(slow['rate'])} MB/s, "
            f"{slow['ratio']:.1f}x slower than the others' median ({mb(slow['others_rate'])} MB/s); its link was busy "
            f"{1e3 * slow['link_time_per_step']:.0f} ms per step, ~{1e3 * slow['cost_per_step']:.0f} ms more than its "
            "bytes take at the others' rate")


def warn_if_data_bound(ctx, record, rank=0, share=0.3):
    """One line when waiting for data takes more than `share` of a step: the loader, not sync, is measured."""
    if record["avg_batch_time"] > 0 and record["avg_data_time"] / record["avg_batch_time"] > share:
        log(ctx, f"warning: data loading is {100 * record['avg_data_time'] / record['avg_batch_time']:.0f}% of "
                 "each step, so this run measures the data loader more than synchronization (raise --workers, "
                 "or use --synthetic)", rank=rank)
