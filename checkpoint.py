"""Checkpoints for --resume: what an exact continuation needs, written so that a crash at any moment leaves one
that can be used, and read only after checking that it belongs to this run.

    <output stem>.ckpt/
        run.json              the run's signature (method and variant, model, world size, batch, data, seed)
        step00000240/         the checkpoint after global step 240 (one folder per checkpoint)
            rank<R>.pt        rank R's part: its RNG states, where it is (epoch, step), the training state it
                              owns (rank 0's when every rank holds the same model; each owner's shard for a PS),
                              and on the results' writer the results so far
            rank<R>.sha256    the part's checksum, written after the part
        latest                names the newest complete checkpoint (written after every part is)
        progress              the global step the run had reached and when (every --log-every steps): after a
                              restart, how many steps are redone

The checkpoint before the latest is kept until a newer one is complete, so a torn or corrupt latest part falls
back to it with a one-line notice, never to a silent fresh start. RunCheckpoints is what the training loop does
with them (driver.Run calls it): resume, the progress mark, a checkpoint after a step or at an epoch's end.
"""
import dataclasses
import hashlib
import io
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

import measure
from common import UserError, log

def folder(args):
    return Path(args.output).with_name(Path(args.output).stem + ".ckpt")


def signature(args, ctx, info, method):
    """What must be the same for a checkpoint to continue this run: {what: value}, named as the user knows them."""
    return {"method": method.kind, **{f"--{k.replace('_', '-')}": v for k, v in method.settings.items()},
            "--arch": args.arch, "processes": ctx.world_size, "--batch-size": args.batch_size,
            "dataset": f"{info.name} at {info.root}", "classes": info.num_classes,
            "training images": info.train_size, "--image-size": info.image_size, "--seed": args.seed,
            **({"--compute-model": args.compute_model} if getattr(args, "compute_model", None) else {})}


def _rng():
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng(rng):
    torch.set_rng_state(rng["cpu"].cpu())
    if rng["cuda"]:
        torch.cuda.set_rng_state_all([t.cpu() for t in rng["cuda"]])


def _write(path, obj):
    """torch.save through a temporary file and a rename, then its sha256 beside it: a part is either whole and
    verifiable or absent."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    blob = buffer.getbuffer()
    for name, content in ((path, blob), (path.with_suffix(".sha256"), hashlib.sha256(blob).hexdigest().encode())):
        tmp = name.with_name(f".{name.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, name)
        except OSError as e:
            tmp.unlink(missing_ok=True)  # a full disk keeps no torn temporary file
            raise OSError(e.errno, e.strerror, str(name)) from e


def _read(path, device):
    """A part, or None when it is missing, torn or corrupt (its checksum does not match)."""
    try:
        blob = path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != path.with_suffix(".sha256").read_text().strip():
            return None
        return torch.load(io.BytesIO(blob), map_location=device, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError):
        return None


def launch():
    """This torchrun launch's id (its --rdzv-id, a fresh uuid under --standalone), the same in every rendezvous round
    of it; None outside torchrun or where it is torchrun's default "none" (the same for every launch)."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    return run if run and run != "none" else None


def from_this_launch(args):
    """Whether the checkpoints at --output were written by this torchrun launch, under --max-restarts: then this
    process is a restart, also where torchrun says it is not (a node's round started because another node re-joined
    counts TORCHELASTIC_RESTART_COUNT 0)."""
    if not launch() or int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) == 0:
        return False
    try:
        return json.loads((folder(args) / "run.json").read_text()).get("launch") == launch()
    except (OSError, ValueError, AttributeError):
        return False


def for_run(args, ctx, info, method, writer):
    """A run's checkpoints, loaded when it resumes (--resume) or torchrun restarted it (--max-restarts), saved
    with --resume, --checkpoint-every or restarts allowed; a checkpoint of another run is refused before anything
    is touched. Returns (Checkpoints, the loaded checkpoint or None, restarted?, torchrun's attempt)."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    restarts_allowed = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
    restarted = attempt > 0 or from_this_launch(args)
    ckpt = Checkpoints(args, ctx, signature(args, ctx, info, method), owner=0 if method.replicated else ctx.rank,
                       writer=writer, load=args.resume or restarted,
                       save=args.resume or args.checkpoint_every > 0 or restarts_allowed)
    ckpt.check()
    return ckpt, ckpt.load(), restarted, attempt


class Checkpoints:
    """This run's checkpoints. `owner`: the rank whose training state this rank restores (0 when every rank
    holds the same model, itself when each owns a shard); `writer`: the rank whose part holds the results.
    `load`: continue from the latest checkpoint when there is one; `save`: write them."""

    def __init__(self, args, ctx, sign, owner, writer, load, save):
        self.root, self.ctx, self.sign, self.owner, self.writer = folder(args), ctx, sign, owner, writer
        self.loading, self.saving = load, save

    def check(self):
        """Before anything is touched: refuses, in one line naming both values, a checkpoint of another run; and
        a fresh run that would write its checkpoints over an earlier run's."""
        run = self.root / "run.json"
        if self.saving and not self.loading and (self.root / "latest").exists():
            raise UserError(f"{self.root} holds the checkpoints of an earlier run (add --resume to continue it, or "
                            "remove that folder to start over)")
        if not (self.loading and run.exists()):
            return
        try:
            theirs = json.loads(run.read_text())
        except ValueError:
            raise UserError(f"{run} is not readable (remove {self.root} to start over)") from None
        for key, mine in self.sign.items():
            if key in theirs and theirs[key] != mine:
                raise UserError(f"checkpoint {self.root} is from another run: {key} {theirs[key]} there, {mine} here "
                                f"(resume with the same settings, or remove {self.root} or drop --resume to start "
                                "over; the results file was left as it was)")

    def save(self, step, part):
        """Writes this rank's `part` of the checkpoint after global step `step` (every rank calls it); the
        checkpoint counts once `latest` names it, after every rank has written its part."""
        start = time.perf_counter()
        here = self.root / f"step{step:08d}"
        failed = self._agree(lambda: _write(self._mkdir(here) / f"rank{self.ctx.rank}.pt",
                                            {**part, "step": step, "rng": _rng()}))
        if not failed:
            failed = self._agree(lambda: self._point_to(here) if self.ctx.is_main else None)
        if failed:  # `latest` still names the checkpoint before: it and the results stay valid
            if self.ctx.is_main:
                shutil.rmtree(here, ignore_errors=True)
            self.saving = False
        return time.perf_counter() - start

    @staticmethod
    def _mkdir(here):
        here.mkdir(parents=True, exist_ok=True)
        return here

    def _agree(self, write):
        """Runs this rank's `write()`; every rank learns whether any failed (one all-reduce, in place of the barrier
        a checkpoint needs anyway), and the lowest failing rank says in one line which path and why, once: the run
        goes on without checkpoints (docs/faults.md). True when one failed."""
        try:
            write()
            mine = float(self.ctx.world_size)
        except OSError as e:
            mine, cause = float(self.ctx.rank), e
        first = int(measure.all_reduce(torch.tensor([mine], device=self.ctx.device), dist.ReduceOp.MIN).item())
        if first == self.ctx.rank:
            print(f"warning: checkpoint not written: {cause.filename or self.root}: {cause.strerror or cause}; the "
                  f"run goes on without checkpoints (the last one, {self._latest() or 'none'}, and the results stay "
                  "valid)", flush=True)
        return first < self.ctx.world_size

    def _latest(self):
        try:
            return self.root / (self.root / "latest").read_text().strip()
        except OSError:
            return None

    def _point_to(self, here):
        """Rank 0, once every part is written: `latest` names `here`; older ones but the one before are removed."""
        (self.root / "run.json").write_text(json.dumps({**self.sign, "launch": launch()}, indent=1))
        pointer = self.root / "latest"
        before = pointer.read_text().strip() if pointer.exists() else None
        tmp = self.root / ".latest.tmp"
        try:
            tmp.write_text(here.name)
            os.replace(tmp, pointer)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        for old in self.root.glob("step*"):  # keep this one and the complete one before it; a newer one is
            if old.name < here.name and old.name != before:  # being written by a rank that went on already
                shutil.rmtree(old, ignore_errors=True)

    def mark_progress(self, step):
        """The writer notes how far the run has got (a tiny file, every --log-every steps)."""
        tmp = self.root / ".progress.tmp"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp.write_text(f"{step} {time.time()}")
            os.replace(tmp, self.root / "progress")
        except OSError:  # a full or read-only disk: only a restart's count of redone steps needs it
            tmp.unlink(missing_ok=True)

    def last_progress(self):
        """(global step, unix time) of the last progress mark, or None."""
        try:
            step, when = (self.root / "progress").read_text().split()
            return int(step), float(when)
        except (OSError, ValueError):
            return None

    def load(self):
        """The newest checkpoint every rank can read: this rank's part (epoch, done, in_epoch, step), with the
        owner's training state as "state" and the results (on the writer; else None), this rank's RNG restored;
        None without one. A torn or corrupt latest falls back to the one before, said in one line; none readable
        is an error, never a fresh start."""
        if not (self.loading and (self.root / "latest").exists()):
            return None
        latest = (self.root / "latest").read_text().strip()
        candidates = sorted((p for p in self.root.glob("step*") if p.name <= latest), reverse=True)
        for here in candidates:
            parts = {r: _read(here / f"rank{r}.pt", self.ctx.device) for r in {self.ctx.rank, self.owner}}
            ok = measure.all_reduce(torch.tensor([float(all(p is not None for p in parts.values()))],
                                                 device=self.ctx.device), dist.ReduceOp.MIN).item()
            if ok:
                if here.name != latest:
                    log(self.ctx, f"notice: checkpoint {self.root / latest} is incomplete or corrupt; resuming from "
                                  f"the one before it, {here}")
                mine = parts[self.ctx.rank]
                _set_rng(mine["rng"])
                return {**mine, "state": parts[self.owner]["state"], "results": mine.get("results")}
        raise UserError(f"no readable checkpoint in {self.root} (every one is incomplete or corrupt; remove it, or "
                        "drop --resume, to start over)")


# --------------------------------------------------------------------------- what the training loop does with them
class RunCheckpoints:
    """The checkpoints as a run's loop uses them (driver.Run): found (for_run) before anything is touched; a resumed
    run's training state put back and a restart recorded (`restore(results)`: from then on every checkpoint holds
    those results on the writer); the progress mark after each step; a checkpoint after a step when --checkpoint-every
    or a stop is due, and at an epoch's end (every epoch without --checkpoint-every), their time in the epoch's
    results."""

    def __init__(self, args, ctx, info, method, writer):
        self.args, self.ctx, self.method, self.writer = args, ctx, method, writer
        self.store, self.resumed, self.restarted, self.attempt = for_run(args, ctx, info, method, writer)
        resumed = self.resumed
        self.saved_results = resumed["results"] if resumed and ctx.rank == writer else None
        self.epochs_done, self.in_epoch = (resumed["epoch"], resumed.get("in_epoch")) if resumed else (0, None)
        self.results, self.restart, self.cost = None, None, {"seconds": 0.0, "count": 0}

    def restore(self, results):
        """A restart recorded (the writer); a resumed run's state put back on this rank, the resume said and
        recorded."""
        ctx, method, resumed, self.results = self.ctx, self.method, self.resumed, results
        if self.restarted and ctx.rank == self.writer:
            self.restart = Restart(self.store, resumed, self.attempt, results)
        if not resumed:
            return
        for name, obj in method.state.items():
            obj.load_state_dict(resumed["state"][name])
        if not self.restarted:
            results.update(resumed_after_epoch=[*results.data.get("resumed_after_epoch", []), self.epochs_done])
        log(ctx, f"{'restarted' if self.restarted else 'resumed'} after epoch {self.epochs_done}"
                 + (f", step {resumed['done']} of epoch {self.epochs_done + 1}" if resumed["done"] else "")
                 + f" from {self.store.root}", rank=self.writer)

    def global_step(self, steps):
        """The global step the run continues after (0 for a fresh run), at `steps` steps an epoch."""
        return self.epochs_done * steps + (self.resumed["done"] if self.resumed else 0)

    def continued(self, epoch):
        """(the step `epoch` starts at, its measure.EpochState so far or None): a resumed epoch's, else (0, None)."""
        if not (self.resumed and epoch == self.epochs_done + 1):
            return 0, None
        return self.resumed["done"], measure.EpochState(**self.in_epoch) if self.in_epoch else None

    def progress(self, step, done):
        """After each step: when a restarted run was back to training (the writer's Restart), and every --log-every
        steps of the epoch the mark a later restart counts its redone steps from."""
        if self.restart:
            self.restart.reached(step)
        if self.store.saving and self.ctx.rank == self.writer and done % self.args.log_every == 0:
            self.store.mark_progress(step)

    def at_step(self, step, epoch, done, snapshot=None, due=False):
        """After `done` steps of epoch `epoch` (global step `step`; every rank): a checkpoint when --checkpoint-every
        says so or `due` (a stop). A pipelined step's exchange ends first, so the checkpoint holds every update of
        it; `snapshot()`: the epoch's EpochState so far. True when it wrote one."""
        every = self.args.checkpoint_every
        if not (self.store.saving and (due or every and step % every == 0)):
            return False
        if self.method.flush:
            self.method.flush()
        self._save(step, epoch - 1, done, dataclasses.asdict(snapshot()) if snapshot else None)
        return True

    def at_epoch_end(self, step, epoch, due=False):
        """After epoch `epoch` (global step `step`; every rank): its checkpoint (without --checkpoint-every, or on
        its multiple, or `due`), and the epoch's checkpoint time and count into its results (the writer)."""
        every = self.args.checkpoint_every
        if self.store.saving and (due or not every or step % every == 0):
            self._save(step, epoch, 0, None)
        if self.store.saving and self.ctx.rank == self.writer:
            self.results.data["epochs"][-1].update(checkpoint_time=self.cost["seconds"], checkpoints=self.cost["count"])
            self.results.save()
        self.cost = {"seconds": 0.0, "count": 0}

    def after(self, step):
        """The checkpoint written after `step`, or None when checkpoints are not (or no longer) written."""
        return self.store.root / f"step{step:08d}" if self.store.saving else None

    def _save(self, step, epoch, done, in_epoch):
        """This rank's part of the checkpoint after `done` steps of the epoch after `epoch`, written and timed."""
        ctx, method = self.ctx, self.method
        state = None if method.replicated and ctx.rank != 0 else {  # rank 0's alone when every rank holds the same
            name: obj.state_dict() for name, obj in method.state.items()}
        part = {"epoch": epoch, "done": done, "in_epoch": in_epoch, "state": state,
                "results": self.results.data if ctx.rank == self.writer else None}
        self.cost["seconds"] += self.store.save(step, part)
        self.cost["count"] += 1


class Restart:
    """The writer's record of a restart by torchrun: when, from which checkpoint step, how far the failed
    attempt had got (its last progress mark), how many steps are redone, and when training was back there."""

    def __init__(self, ckpt, resumed, attempt, results):
        self.results, self.before = results, ckpt.last_progress()
        self.entry = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "unix_time": time.time(), "attempt": attempt,
                      "resumed_from_step": resumed["step"] if resumed else 0,
                      "last_step_before": self.before[0] if self.before else None}
        if self.before:
            self.entry["steps_redone"] = max(0, self.before[0] - self.entry["resumed_from_step"])
        results.data.setdefault("restarts", []).append(self.entry)
        results.save()

    def reached(self, step):
        if "first_step_unix_time" not in self.entry:
            self.entry["first_step_unix_time"] = time.time()
            self.entry["seconds_to_first_step"] = self.entry["first_step_unix_time"] - self.entry["unix_time"]
        if self.before and "seconds_lost" not in self.entry and step >= self.before[0]:
            self.entry["seconds_lost"] = time.time() - self.before[1]  # from the failed attempt's last mark
