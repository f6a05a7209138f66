"""What every method's run shares, so that each script shows only what is particular to it, its loop included:

    with driver.session(args) as ctx:                   # the output checked, the process group joined, and left
        ...                                             # the script builds its model, its sync and its step
        with driver.Run(args, ctx, ds, Method(...)) as run:
            for epoch in run.epochs(): ...              # the script's own loop (Run's docstring)

`Run` writes the start-up line, resumes from a checkpoint or measures the communication yardstick, hands the
loop its epochs and each epoch's steps (Epoch: batches, clock, lr, sums, --checkpoint-every), and after
each epoch validates, reads the link counters, checkpoints and writes the results.

A method's step is `step(images, targets, clock, lr, kind="comm") -> (loss, logits)`, one shape for the three
methods (with --accumulate K, `images` and `targets` are lists of K micro-batches: one optimizer step, one
exchange): "comm" is the method's training step; "local" the same step with no communication at all (forward,
backward and optimizer update on this rank alone); "blocking", for a method that overlaps its exchange with
backward, the same exchange blocking after backward. The yardstick times these kinds against each other.
"""
import contextlib
import dataclasses
import os
import sys
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

import checkpoint
import common
import compute_model
import data
import faults
import measure
import modes
import targets
from common import log
from results import Results



@dataclasses.dataclass
class Method:
    """What one method hands the driver on this rank."""
    kind: str  # baseline_ddp | all_reduce | ps
    description: str  # the variant in words, for the start-up line
    settings: dict  # the flags that make it this variant: {"sync": "overlap", ...}; a checkpoint must match them
    model: torch.nn.Module  # what is validated
    step: Callable  # this rank's step (above); on a server that does not train, what it does in each kind of step
    state: dict  # {name: object with state_dict()}: what this rank checkpoints, restores and the yardstick puts back
    trainers: list  # the ranks that train; the first writes the results
    fields: dict = dataclasses.field(default_factory=dict)  # the method's own top-level results fields
    overlaps: bool = False  # has a "blocking" kind: the hidden share is measured
    run_length: int = 1  # steps of one kind in a row in the yardstick (2 when a step waits for the one before)
    group: object = None  # the trainers' process group (None: every rank trains)
    replicated: bool = True  # every rank holds the same state: rank 0's is checkpointed and restored everywhere
    share: Optional[Callable] = None  # every rank: (the server's figures or None) -> those figures on every rank
    figures: Optional[Callable] = None  # (record, shared) -> the method's own per-epoch figures, on the trainers
    serve_epoch: Optional[Callable] = None  # (epoch, steps, first step, after_step) -> figures: a server's epoch
    end_of_epoch: Optional[Callable] = None  # (clock): inside the last step's clock (e.g. the PS's final pull)
    before_epochs: Optional[Callable] = None  # once, after the yardstick or the resume (e.g. the PS's first pull)
    flush: Optional[Callable] = None  # () -> None: ends the exchanges a step left in flight (a pipelined method)
    after_resume: Optional[Callable] = None  # once, after the state is restored
    compute: object = None  # the --compute-model on `model` (set by train): the proxy batches train on

    def batch(self, args, info, ctx):
        """The yardstick's fixed batch, as the model trains on it."""
        images, targets = measure.fixed_batch(args, info, ctx)
        images, targets = self.compute.inputs(images, targets) if self.compute else (images, targets)
        k = args.accumulate  # a step of --accumulate K: K micro-batches, one exchange
        return (images, targets) if k == 1 else ([images] * k, [targets] * k)

    @property
    def name(self):
        return modes.METHODS[self.kind]


@contextlib.contextmanager
def session(args):
    """The output checked before any work, the process group joined; left at the end, after a barrier when the
    run succeeded (so no rank closes a connection a peer still reads)."""
    common.check_output_path(args.output)
    ctx = common.setup_distributed(args)
    try:
        yield ctx
        common.cleanup_distributed(barrier=True)
    finally:
        common.cleanup_distributed()


class Run:
    """Everything around one method's training loop on this rank (each script's `train` is the loop; every rank
    builds a Run, in the same order). Building it writes the start-up line and resumes from a checkpoint or
    measures the communication yardstick; leaving it writes the results (a peer that failed or hung: the hang's
    report first). A group torchrun restarted (--max-restarts) continues from its latest checkpoint by itself."""

    def __init__(self, args, ctx, ds, method):
        info, writer = ds.info, method.trainers[0]
        self.args, self.ctx, self.info, self.method, self.writer = args, ctx, info, method, writer
        self.trains = ctx.rank in method.trainers
        # --resume, --checkpoint-every, or a round torchrun restarted; a checkpoint of another run is refused here
        ckpt, resumed, restarted, attempt = checkpoint.for_run(args, ctx, info, method, writer)
        self.ckpt, self.resumed = ckpt, resumed
        self.results = results = Results(args.output, method, ctx, args, info, writer=ctx.rank == writer,
                                         saved=resumed["results"] if resumed and ctx.rank == writer else None)
        if results.moved:
            log(ctx, f"notice: {args.output} held {results.moved[1]}: moved it to {results.moved[0]} (a finished "
                     "run is never replaced)", rank=writer)
        self.loader = data.train_loader(ds, args, ctx, len(method.trainers), method.trainers.index(ctx.rank)) \
            if self.trains else None
        self.val_loader = data.val_loader(ds, args, ctx, ctx.world_size, ctx.rank)
        method.compute = compute_model.setup(args, ctx, info, method.model, results)  # None without the flag
        log(ctx, start_line(args, ctx, info, method), rank=writer)
        self.restart = Restart(ckpt, resumed, attempt, results) if restarted and ctx.rank == writer else None
        done_epochs, self.in_epoch = 0, None
        if resumed:
            done_epochs, self.in_epoch = _restore(ctx, method, ckpt, resumed, restarted, results, writer)
        elif args.overhead_pairs:
            _record_yardstick(args, ctx, info, method, results, self.trains, writer)
        # Every rank takes the writer's word: a resumed run whose epochs already reached the target does no more.
        self.target = Target(args, ctx, results, writer, resumed=bool(resumed))
        if method.before_epochs:
            method.before_epochs()
        self.first = done_epochs + 1
        # SIGTERM / SIGINT: every rank stops at one agreed step; where each rank is, for a hang's report (faults.py)
        self.stop = faults.StopOnSignal(ctx.rank, done_epochs * info.steps + (resumed["done"] if resumed else 0))
        self.meter = measure.LinkMeter(ctx)  # each node's link time, on its local rank 0 (a thread sampling it)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        try:
            if isinstance(error, Exception) and common.is_peer_failure(error):
                _report_hang(self.args, self.ctx, self.method, self.stop, self.results, self.writer, error)
        finally:
            self.meter.close()
        if error is None:
            self.stop.restore()
            unwritten = self.results.finish()
            if unwritten:  # the group is left first (every rank at the barrier): the one error line is the only one
                common.cleanup_distributed(barrier=True)
                raise common.UserError(unwritten)
            log(self.ctx, f"wrote {self.args.output}", rank=self.writer)
        return False

    def epochs(self):
        """The epochs still to train, from the first after a resume; none once the target is reached."""
        for epoch in range(self.first, self.args.epochs + 1):
            if self.target.reached:
                break
            self.epoch, self.cost = epoch, {"seconds": 0.0, "count": 0}
            self.after_step = _at_step(self.args, self.ctx, self.info, self.method, self.ckpt, self.results,
                                       self.restart, epoch, self.cost, self.writer, self.stop, self.meter)
            self.link = measure.read_link_bytes(self.ctx)
            self.meter.start_epoch()
            self.first_step = self.resumed["done"] if self.resumed and epoch == self.first else 0
            yield epoch

    def steps(self):
        """This epoch's steps on a trainer (an Epoch), continuing a resumed epoch where it stopped."""
        resumed_epoch = self.in_epoch and self.epoch == self.first
        return Epoch(self.ctx, self.args, self.epoch, self.loader, self.info.steps, group=self.method.group,
                             at_step=self.after_step, cold=self.epoch == self.first, proxy=self.method.compute,
                             state=measure.EpochState(**self.in_epoch) if resumed_epoch else None)

    def end_epoch(self, record=None, served=None):
        """After the epoch's steps (every rank): a trainer's `record`, a server's `served` figures. Validation,
        link counters, the method's figures, checkpoint, results, the epoch line; then a stop signal or the
        target ends the run."""
        args, ctx, info, method, results, writer, epoch = (self.args, self.ctx, self.info, self.method,
                                                           self.results, self.writer, self.epoch)
        self.meter.mark()
        link = measure.busiest_link(ctx, self.link, info.steps - self.first_step)
        node_links = self.meter.epoch(ctx.rank // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        shared = method.share(served) if method.share else None
        val_loss, val_accuracy = measure.evaluate(method.model, self.val_loader, ctx, args, proxy=method.compute)
        if self.trains:
            record.update(link=link, node_links=node_links, val_loss=val_loss, val_accuracy=val_accuracy)
            record.update(method.figures(record, shared) if method.figures else {})
            record.update(measure.scaling_efficiency(record, results.data.get("comm_overhead"), method.trainers, args))
            if method.compute:
                results.data["compute_model"] = method.compute.summary()
            results.add_epoch(record)
        stopping = self.stop.due(epoch * info.steps)
        if self.ckpt.saving and (stopping or not args.checkpoint_every
                                 or epoch * info.steps % args.checkpoint_every == 0):
            self.cost["seconds"] += self.ckpt.save(epoch * info.steps,
                                                   _part(method, ctx, epoch, 0, None, results, writer))
            self.cost["count"] += 1
        if self.ckpt.saving and ctx.rank == writer:
            results.data["epochs"][-1].update(checkpoint_time=self.cost["seconds"], checkpoints=self.cost["count"])
            results.save()
        if self.trains:
            _epoch_lines(ctx, record, node_links, writer)
        if stopping:
            _stop(args, ctx, self.stop, epoch * info.steps, epoch, info.steps, info, self.ckpt, results, writer)
        self.target.check(val_accuracy)


def _epoch_lines(ctx, record, node_links, writer):
    """The epoch's line, and the warnings it calls for: data-bound, a straggler, a slow link."""
    log(ctx, epoch_line(record), rank=writer)
    warn_if_data_bound(ctx, record, rank=writer)
    straggler = record["rank_compute"]["straggler"]
    if straggler:
        log(ctx, f"straggler: rank {straggler['rank']} computed {straggler['ratio']:.2f}x the others' median "
                 f"per step; the others waited ~{1e3 * straggler['cost_per_step']:.0f} ms per step for it", rank=writer)
    if node_links and node_links["slow"]:
        log(ctx, slow_link_line(node_links["slow"]), rank=writer)


class Epoch:
    """One epoch of training steps on this rank, as each script's `train` runs it: iterating gives each step's
    batch on the device (its wait is the step's "data" phase) with `clock` begun and `lr` set; `count()` takes
    the step's loss and logits; `finish()` returns the epoch's record, reduced over the trainers.

    Loss and accuracy accumulate on the device; every --log-every steps every trainer reads the group's sums
    (the same host sync on every rank, and a NaN anywhere stops them all). A `cold` process's first
    --warmup-steps steps (epoch 1, or the first epoch after a restart) are left out of throughput and phase
    times. Phase times: `data` is the wait for the next batch, the method's marks name the rest; mean and max
    over the trainers of `group` (None: every rank). `state` (an EpochState from a checkpoint) continues an
    epoch from its step; `at_step(done, snapshot)` runs after each step, `snapshot()` giving the EpochState so
    far (a host sync: call it only for a checkpoint), and returns True when it wrote one (its time is then the
    step's "checkpoint" phase). `proxy` (a compute_model.ComputeModel): the model trains on its proxy of each
    batch, each proxy image counted as `proxy.weight` modeled images.
    """

    def __init__(self, ctx, args, epoch, loader, steps, *, group=None, state=None, cold=None, at_step=None,
                 proxy=None):
        self.ctx, self.args, self.epoch, self.loader, self.steps = ctx, args, epoch, loader, steps
        self.group, self.at_step, self.proxy = group, at_step, proxy
        self.state = state = state or measure.EpochState(epoch)
        self.first = first = state.step
        cold = epoch == 1 if cold is None else cold
        self.warmup = first + min(args.warmup_steps, steps - first - 1) if cold else first
        self.clock, self.lrs, self.lr = measure.StepClock(ctx.device), list(state.lrs), None
        self.sums, self.losses = torch.tensor(state.sums, dtype=torch.float64, device=ctx.device), []
        self.seen, self.timed_seen = state.seen, state.timed_seen  # counts known on the host: no per-step copy
        reports = ctx.rank == common.first_rank(group)
        self.progress = measure.Progress(f"epoch {epoch}", steps, reports)
        self.tracer = measure.Tracer(args, ctx, self.warmup, steps) if args.profile and reports else None
        self.trainers = dist.get_world_size(group) if dist.is_initialized() else 1
        self.step = first

    def __iter__(self):
        """Each step's (images, targets) on the device; `self.clock` has begun the step and `self.lr` is its rate."""
        if hasattr(getattr(self.loader, "sampler", None), "set_epoch"):
            self.loader.sampler.set_epoch(self.epoch)  # a new shuffle each epoch, the same on every replica
            self.loader.sampler.start = self.first * self.args.accumulate * self.args.batch_size
        try:
            measure.synchronize(self.ctx.device)
            self.t_start = self.t_timed = time.perf_counter()
            batches = iter(self.loader)
            for self.step in range(self.first, self.steps):
                if self.step == self.warmup > self.first:
                    measure.synchronize(self.ctx.device)
                    self.t_timed = time.perf_counter()
                if self.tracer:
                    self.tracer.at(self.step)
                self.clock.begin()
                images, targets = measure.next_step_batches(batches, self.ctx, self.args, self.proxy)
                self.clock.mark("data")
                self.lr = common.lr_at(self.args, self.epoch - 1 + self.step / self.steps)
                self.lrs.append(self.lr)
                yield images, targets
        finally:
            self.progress.close()  # before any error line, so that line starts clean

    def count(self, loss, logits, targets):
        """The step's loss and accuracy into the sums; the --log-every progress line; the step's at_step."""
        step, args = self.step, self.args
        targets = torch.cat(targets) if isinstance(targets, list) else targets
        weight = self.proxy.weight if self.proxy else 1
        n = targets.numel() * weight
        self.sums += torch.stack([loss.detach().double() * n, (logits.argmax(1) == targets).sum().double() * weight])
        self.seen, self.timed_seen = self.seen + n, self.timed_seen + (n if step >= self.warmup else 0)
        self.losses.append(loss.detach())
        if (step + 1) % args.log_every == 0 or step + 1 == self.steps:
            loss_sum, correct = measure.all_reduce(self.sums.clone(), group=self.group).tolist()
            measure.check_finite(loss_sum, self.epoch, step)
            seen, rate = self.seen * self.trainers, (self.seen - self.state.seen) * self.trainers
            self.progress.update(step + 1, loss=f"{loss_sum / seen:.4f}", acc=f"{100 * correct / seen:.2f}%",
                                 img_s=f"{rate / (time.perf_counter() - self.t_start):.1f}")
        if self.at_step and step + 1 < self.steps and self.at_step(step + 1, lambda: self.snapshot(step + 1)):
            self.clock.mark("checkpoint")  # a --checkpoint-every checkpoint was written after this step

    def snapshot(self, done):
        """The EpochState after `done` steps (a host sync)."""
        measure.synchronize(self.ctx.device)
        now, state, skip = time.perf_counter(), self.state, self.warmup - self.first
        phases, times = self.clock.phase_sums(skip=skip), self.clock.step_times(skip=skip)
        compute = self.clock.per_step("compute", skip=skip)
        return measure.EpochState(
            self.epoch, done, self.sums.tolist(), self.seen, self.timed_seen,
            state.losses + torch.stack(self.losses).float().tolist(), list(self.lrs),
            state.elapsed + now - self.t_start, state.timed + (now - self.t_timed if done > self.warmup else 0.0),
            state.timed_steps + len(times), {k: state.phases.get(k, 0.0) + phases.get(k, 0.0)
                                             for k in {*state.phases, *phases}},
            [a + b for a, b in zip(state.step_moments, (sum(times), sum(t * t for t in times)))],
            [a + b for a, b in zip(state.compute_moments, (sum(compute), sum(t * t for t in compute)))])

    def finish(self):
        """The epoch's record, reduced over the trainers (every trainer calls it after the last step)."""
        if self.tracer:
            self.tracer.at(self.steps)
        record = measure.epoch_record(self.ctx, self.group, self.snapshot(self.steps), self.steps, self.trainers)
        return {**record, **({"profile": self.tracer.summary} if self.tracer and self.tracer.summary else {})}



def run_epoch(ctx, args, epoch, loader, steps, train_step, *, end_of_epoch=None, **options):
    """One epoch of `train_step(images, targets, clock, lr) -> (loss, logits)`, the loop the scripts write out;
    `end_of_epoch(clock)` runs inside the last step's clock; `options` as Epoch's. Returns the epoch's record."""
    epoch_steps = Epoch(ctx, args, epoch, loader, steps, **options)
    for images, targets in epoch_steps:
        epoch_steps.count(*train_step(images, targets, epoch_steps.clock, epoch_steps.lr), targets)
    if end_of_epoch:
        end_of_epoch(epoch_steps.clock)
    return epoch_steps.finish()



def _restore(ctx, method, ckpt, resumed, restarted, results, writer):
    """The checkpoint's state put back on this rank, the resume recorded and said; (epochs done, the epoch in
    progress's saved state or None)."""
    for name, obj in method.state.items():
        obj.load_state_dict(resumed["state"][name])
    if method.after_resume:
        method.after_resume()
    done_epochs, in_epoch = resumed["epoch"], resumed.get("in_epoch")
    if not restarted:
        results.update(resumed_after_epoch=[*results.data.get("resumed_after_epoch", []), done_epochs])
    log(ctx, f"{'restarted' if restarted else 'resumed'} after epoch {done_epochs}"
             + (f", step {resumed['done']} of epoch {done_epochs + 1}" if resumed["done"] else "")
             + f" from {ckpt.root}", rank=writer)
    return done_epochs, in_epoch


def _record_yardstick(args, ctx, info, method, results, trains, writer):
    """A fresh run's yardstick, into the results and the log (by the trainers)."""
    overhead = yardstick(args, ctx, info, method)
    if trains:
        results.update(comm_overhead=overhead)
        log(ctx, overhead_line(overhead, len(method.trainers)), rank=writer)


def _report_hang(args, ctx, method, stop, results, writer, error):
    """A peer failed or hung: this rank's line on stderr and the report in the results (the writer); rank 0, which
    hosts the store, waits for the others to have read it (faults.linger). The caller raises the error again."""
    report, line = faults.hang_report(ctx, method.kind, stop, error)
    print(line, file=sys.stderr, flush=True)
    if ctx.rank == writer:
        results.update(hang=report)
    faults.linger(ctx, report, 60 * args.timeout + 5, stop)


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


def _part(method, ctx, epoch, done, in_epoch, results, writer):
    """This rank's part of a checkpoint taken after `done` steps of the epoch after `epoch`."""
    return {"epoch": epoch, "done": done, "in_epoch": in_epoch, "state": _state_dicts(method, ctx),
            "results": results.data if ctx.rank == writer else None}


def _at_step(args, ctx, info, method, ckpt, results, restart, epoch, cost, writer, stop, meter):
    """What runs after each training step of `epoch`: the progress mark a restart counts redone steps from,
    and the --checkpoint-every checkpoints (every rank at the same step; `snapshot()` the epoch so far)."""
    def at_step(done, snapshot=None):
        meter.mark()
        step = (epoch - 1) * info.steps + done
        if restart:
            restart.reached(step)
        if ckpt.saving and ctx.rank == writer and done % args.log_every == 0:
            ckpt.mark_progress(step)
        stopping = stop.due(step)
        wrote = False
        if ckpt.saving and (stopping or args.checkpoint_every and step % args.checkpoint_every == 0):
            if method.flush:  # a pipelined step's exchange ends first: the checkpoint holds every update of it
                method.flush()
            state = dataclasses.asdict(snapshot()) if snapshot else None
            cost["seconds"] += ckpt.save(step, _part(method, ctx, epoch - 1, done, state, results, writer))
            cost["count"] += 1
            wrote = True
        if stopping:
            _stop(args, ctx, stop, step, epoch, done, info, ckpt, results, writer)
        return wrote
    return at_step


def _stop(args, ctx, stop, step, epoch, done, info, ckpt, results, writer):
    """Every rank, at the agreed step after a stop signal: the results say where it stopped, then Stopped."""
    saved = ckpt.root / f"step{step:08d}" if ckpt.saving else None
    if ctx.rank == writer:
        results.update(stopped={"signal": stop.name, "after_step": step, "checkpoint": str(saved) if saved else None})
    raise common.Stopped(stop.signum, step, (
        f"stopped by {stop.name} after step {step} (epoch {epoch}, step {done} of {info.steps}): "
        + (f"checkpoint {saved}, rerun with --resume to continue; " if saved else "no checkpoint (--resume or "
           "--checkpoint-every writes them); ")
        + f"the {len(results.data['epochs'])} finished epoch(s) are kept in {args.output}"))


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


def _state_dicts(method, ctx):
    """This rank's training state for a checkpoint: rank 0's alone when every rank holds the same."""
    if method.replicated and ctx.rank != 0:
        return None
    return {name: obj.state_dict() for name, obj in method.state.items()}


# --------------------------------------------------------------------------- the yardstick
def yardstick(args, ctx, info, method):
    """The communication overhead of the method's step against its no-communication step (and its blocking
    one), on one fixed batch, leaving the training state exactly as it was. None on a rank that does not train."""
    clock, lr = measure.NoClock(), common.lr_at(args, 0)
    kinds = ("comm", "local", "blocking") if method.overlaps else ("comm", "local")
    steps = {kind: (lambda x, y, kind=kind: method.step(x, y, clock, lr, kind)) for kind in kinds}
    with measure.preserved(method.model, *_stateful(method)):
        overhead = measure.measure_overhead(ctx, args, steps, *method.batch(args, info, ctx),
                                            group=method.group, run_length=method.run_length, flush=method.flush)
    return overhead if ctx.rank in method.trainers else None


def step_without_trace(args, ctx, info, method):
    """One training step on the yardstick's batch whose effects are all undone (DDP rebuilds its buckets after
    its first step: a resumed run gets the bucket layout, and so the rounding, of the run it continues)."""
    with measure.preserved(method.model, *_stateful(method)):
        method.step(*method.batch(args, info, ctx), measure.NoClock(), args.lr)
        if method.flush:
            method.flush()


def _stateful(method):
    return [obj for name, obj in method.state.items() if obj is not method.model]


# --------------------------------------------------------------------------- what the user reads
def start_line(args, ctx, info, method):
    trainers = len(method.trainers)
    who = f"{trainers} trainer(s)" + ("" if trainers == ctx.world_size else f" of {ctx.world_size} processes")
    line = (f"{method.name} ({method.description}): {who} ({ctx.backend}, {common.device_name(ctx.device)}), "
            f"{args.arch} on {info.describe()}, {info.steps} steps/epoch, batch {args.batch_size}/trainer")
    if args.accumulate > 1:
        line += f" x {args.accumulate} micro-batches a step (--accumulate: one exchange per step)"
    if method.compute:
        c = method.compute.summary()
        line += (f"; {c['label']}: {1e3 * c['modeled_compute_per_step']:.1f} ms forward+backward a step, the model "
                 f"running on {c['proxy_batch']} images at {c['proxy_image_size']} px")
    return line


def overhead_line(overhead, trainers):
    """The yardstick's result in one line, with its spread; the hidden share only where it is beyond the noise."""
    ms = lambda key: f"{1e3 * overhead[key]:.1f}"  # noqa: E731
    line = (f"communication overhead: {ms('overhead')} ms/step ({100 * overhead['overhead_share']:.0f}% of a "
            f"{ms('step_time')} ms step; {overhead['pairs']} pairs, min {ms('overhead_min')}, max "
            f"{ms('overhead_max')})")
    if trainers == 1:
        line += ("; one trainer: no byte crosses a link, so this is the method's own bookkeeping (e.g. DDP's "
                 "bucket copies and hooks)" + (", within noise of zero" if overhead["overhead_min"] <= 0 else ""))
    if overhead.get("blocking_overhead") is not None:
        noise = max(overhead["overhead_max"] - overhead["overhead_min"],
                    overhead["blocking_overhead_max"] - overhead["blocking_overhead_min"])
        line += f"; blocking after backward {ms('blocking_overhead')} ms, so " + (
            f"{100 * overhead['hidden_share']:.0f}% is hidden behind backward"
            if overhead["hidden_share"] is not None and overhead["blocking_overhead"] - overhead["overhead"] > noise else
            f"no share is hidden beyond the noise ({1e3 * noise:.1f} ms)")
    return line


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
