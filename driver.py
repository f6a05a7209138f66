"""What every method's run shares, so that each script shows only what is particular to it, its loop included:

    with driver.session(args) as ctx:                   # the output checked, the process group joined, and left
        ...                                             # the script builds its model, its sync and its step
        with driver.Run(args, ctx, ds, Method(...)) as run:
            for epoch in run.epochs(): ...              # the script's own loop (Run's docstring)

`Run` writes the start-up line, resumes from a checkpoint or measures the communication yardstick, hands the
loop its epochs and each epoch's steps (Epoch: batches, clock, lr, sums, --checkpoint-every), and after
each epoch validates, reads the link counters, checkpoints and writes the results, calling the shared pieces by
name: checkpoint.RunCheckpoints, results (the file, the epoch's lines, the target), measure (the yardstick, the
link meter, an epoch's EpochMeter), faults (a stop signal, a hang's report).

A method's step is `step(images, targets, clock, lr, kind="comm") -> (loss, logits)`, one shape for the three
methods (with --accumulate K, `images` and `targets` are lists of K micro-batches: one optimizer step, one
exchange): "comm" is the method's training step; "local" the same step with no communication at all (forward,
backward and optimizer update on this rank alone); "blocking", for a method that overlaps its exchange with
backward, the same exchange blocking after backward. The yardstick times these kinds against each other.
"""
import contextlib
import dataclasses
from typing import Callable, Optional

import torch

import checkpoint
import common
import compute_model
import data
import faults
import measure
import modes
import results
from common import log


@dataclasses.dataclass(frozen=True)
class Method:
    """What one method hands the driver on this rank, built once by its script's make_method. What only the
    script's own loop calls (the PS's first pull and its server's epochs, the end of a pipelined epoch) stays
    with the script."""
    kind: str  # baseline_ddp | all_reduce | ps
    description: str  # the variant in words, for the start-up line
    settings: dict  # the flags that make it this variant: {"sync": "overlap", ...}; a checkpoint must match them
    model: torch.nn.Module  # what is validated
    step: Callable  # this rank's step (above); on a server that does not train, what it does in each kind of step
    state: dict  # {name: object with state_dict()}: what this rank checkpoints, restores and the yardstick puts back
    trainers: list  # the ranks that train; the first writes the results
    fields: dict = dataclasses.field(default_factory=dict)  # the method's own top-level results fields
    group: object = None  # the trainers' process group (None: every rank trains)
    replicated: bool = True  # every rank holds the same state: rank 0's is checkpointed and restored everywhere
    overlaps: bool = False  # has a "blocking" kind: the yardstick measures the hidden share
    run_length: int = 1  # steps of one kind in a row in the yardstick (2 when a step waits for the one before)
    flush: Optional[Callable] = None  # () -> None: ends the exchanges a step left in flight (a pipelined method)
    figures: Optional[Callable] = None  # every rank after an epoch's steps: (a trainer's record or None, a
    #                                     server's figures or None) -> the method's own fields for the trainers' epoch

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


class Run(contextlib.AbstractContextManager):
    """Everything around one method's training loop on this rank (each script's `train` is the loop; every rank
    builds a Run, in the same order). Building it writes the start-up line and resumes from a checkpoint or
    measures the communication yardstick; leaving it writes the results (a peer that failed or hung: the hang's
    report first). A group torchrun restarted (--max-restarts) continues from its latest checkpoint by itself."""

    def __init__(self, args, ctx, ds, method):
        info, writer = ds.info, method.trainers[0]
        self.args, self.ctx, self.info, self.method, self.writer = args, ctx, info, method, writer
        self.trains = ctx.rank in method.trainers
        # --resume, --checkpoint-every, or a round torchrun restarted; a checkpoint of another run is refused here
        self.ckpt = checkpoint.RunCheckpoints(args, ctx, info, method, writer)
        self.results = results.for_run(args, ctx, info, method, writer, saved=self.ckpt.saved_results)
        self.loader = data.train_loader(ds, args, ctx, len(method.trainers), method.trainers.index(ctx.rank)) \
            if self.trains else None
        self.val_loader = data.val_loader(ds, args, ctx, ctx.world_size, ctx.rank)
        self.compute = compute_model.setup(args, ctx, info, method.model, self.results)  # None without the flag
        log(ctx, start_line(args, ctx, info, method, self.compute), rank=writer)
        self.ckpt.restore(self.results)  # a resumed run's training state put back; a restart recorded
        if args.overhead_pairs and not self.ckpt.resumed:
            measure.record_yardstick(args, ctx, info, method, self.results, self.compute)
        # Every rank takes the writer's word: a resumed run whose epochs already reached the target does no more.
        self.target = results.Target(args, ctx, self.results, writer, resumed=bool(self.ckpt.resumed))
        self.first = self.ckpt.epochs_done + 1
        # SIGTERM / SIGINT: every rank stops at one agreed step; where each rank is, for a hang's report (faults.py)
        self.stop = faults.StopOnSignal(ctx.rank, self.ckpt.global_step(info.steps))
        self.meter = measure.LinkMeter(ctx)  # each node's link time, on its local rank 0 (a thread sampling it)

    def __exit__(self, kind, error, trace):
        self.meter.close()
        if isinstance(error, Exception) and common.is_peer_failure(error):  # reported, then raised again
            faults.report_hang(self.ctx, self.method.kind, self.stop, error, self.results, self.writer,
                               self.args.timeout)
        elif error is None:
            self.stop.restore()
            self.results.close(self.ctx, self.writer)  # complete; a failed last write is one error line

    def epochs(self):
        """The epochs still to train, from the first after a resume; none once the target is reached."""
        for epoch in range(self.first, self.args.epochs + 1):
            if self.target.reached:
                break
            self.epoch = epoch
            self.first_step, self.in_epoch = self.ckpt.continued(epoch)  # a resumed epoch's step and sums so far
            self.meter.start_epoch()
            yield epoch

    def steps(self):
        """This epoch's steps on a trainer (an Epoch), continuing a resumed epoch where it stopped."""
        return Epoch(self.ctx, self.args, self.epoch, self.loader, self.info.steps, group=self.method.group,
                     at_step=self.after_step, cold=self.epoch == self.first, proxy=self.compute,
                     state=self.in_epoch)

    def after_step(self, done, snapshot=None):
        """After each training step (every rank; `done` steps into the epoch, `snapshot()` its EpochState so far):
        a restart's progress mark, a --checkpoint-every checkpoint, a stop signal's stop. True when it wrote one."""
        self.meter.mark()
        step = (self.epoch - 1) * self.info.steps + done
        self.ckpt.progress(step, done)
        stopping = self.stop.due(step)  # every rank stops after the same step, with a checkpoint there
        wrote = self.ckpt.at_step(step, self.epoch, done, snapshot, due=stopping)
        if stopping:
            raise self.stop.stopped(step, self.info.steps, self.ckpt.after(step), self.results, self.writer)
        return wrote

    def end_epoch(self, record=None, served=None):
        """After the epoch's steps (every rank; a trainer's `record`, a server's `served` figures): validation, the
        link counters, the method's figures, results, checkpoint, the epoch line; then a stop or the target."""
        ctx, method, step = self.ctx, self.method, self.epoch * self.info.steps
        links = self.meter.end_epoch(self.info.steps - self.first_step)  # the busiest link, each node's link
        figures = method.figures(record, served) if method.figures else {}  # (the PS's: the servers' shared)
        val_loss, val_accuracy = measure.evaluate(method.model, self.val_loader, ctx, self.args, proxy=self.compute)
        if self.trains:
            record.update(**links, val_loss=val_loss, val_accuracy=val_accuracy, **figures)
            self.results.add_run_epoch(record, method, self.args, self.compute)  # with its scaling efficiency
        stopping = self.stop.due(step)
        self.ckpt.at_epoch_end(step, self.epoch, due=stopping)  # its time into the epoch's results
        if self.trains:
            results.log_epoch(ctx, record, rank=self.writer)  # the epoch's line; data-bound, straggler, slow link
        if stopping:
            raise self.stop.stopped(step, self.info.steps, self.ckpt.after(step), self.results, self.writer)
        self.target.check(val_accuracy)


class Epoch:
    """One epoch of training steps on this rank, as each script's `train` runs it: iterating gives each step's
    batch on the device (its wait is the step's "data" phase) with `clock` begun and `lr` set; `count()` takes the
    step's loss and logits and runs `at_step(done, snapshot)`, which returns True when it wrote a checkpoint (the
    step's "checkpoint" phase); `finish()` returns the epoch's record. How the epoch is measured (the sums, the
    warm-up, --log-every, the record over `group`; `state`, `cold`, `proxy`) is measure.EpochMeter's."""

    def __init__(self, ctx, args, epoch, loader, steps, *, group=None, state=None, cold=None, at_step=None,
                 proxy=None):
        self.ctx, self.args, self.epoch, self.loader, self.steps = ctx, args, epoch, loader, steps
        self.at_step, self.proxy, self.lr = at_step, proxy, None
        self.meter = measure.EpochMeter(ctx, args, epoch, steps, group=group, state=state, cold=cold, proxy=proxy)
        self.clock, self.first = self.meter.clock, self.meter.first

    def __iter__(self):
        """Each step's (images, targets) on the device; `self.clock` has begun the step and `self.lr` is its rate."""
        if hasattr(getattr(self.loader, "sampler", None), "set_epoch"):
            self.loader.sampler.set_epoch(self.epoch)  # a new shuffle each epoch, the same on every replica
            self.loader.sampler.start = self.first * self.args.accumulate * self.args.batch_size
        with self.meter.running():
            batches = iter(self.loader)
            for self.step in range(self.first, self.steps):
                self.meter.begin(self.step)  # the clock begins the step
                images, targets = measure.next_step_batches(batches, self.ctx, self.args, self.proxy)
                self.clock.mark("data")
                self.lr = common.lr_at(self.args, self.epoch - 1 + self.step / self.steps)
                yield images, targets

    def count(self, loss, logits, targets):
        """The step's loss and accuracy into the sums (the --log-every progress line); the step's at_step."""
        step = self.step
        self.meter.count(step, loss, logits, targets, self.lr)
        if self.at_step and step + 1 < self.steps and self.at_step(step + 1, lambda: self.meter.snapshot(step + 1)):
            self.clock.mark("checkpoint")  # a --checkpoint-every checkpoint was written after this step

    def finish(self):
        """The epoch's record, reduced over the trainers (every trainer calls it after the last step)."""
        return self.meter.record()


def run_epoch(ctx, args, epoch, loader, steps, train_step, *, end_of_epoch=None, **options):
    """One epoch of `train_step(images, targets, clock, lr) -> (loss, logits)`, the loop the scripts write out;
    `end_of_epoch(clock)` runs inside the last step's clock; `options` as Epoch's. Returns the epoch's record."""
    epoch_steps = Epoch(ctx, args, epoch, loader, steps, **options)
    for images, targets in epoch_steps:
        epoch_steps.count(*train_step(images, targets, epoch_steps.clock, epoch_steps.lr), targets)
    if end_of_epoch:
        end_of_epoch(epoch_steps.clock)
    return epoch_steps.finish()


def step_without_trace(args, ctx, info, method, compute=None):
    """One training step on the yardstick's batch whose effects are all undone (DDP rebuilds its buckets after
    its first step: a resumed run gets the bucket layout, and so the rounding, of the run it continues)."""
    with measure.preserved(method.model, *measure.stateful(method)):
        method.step(*measure.yardstick_batch(args, info, ctx, compute), measure.NoClock(), args.lr)
        if method.flush:
            method.flush()


# --------------------------------------------------------------------------- the start-up line
def start_line(args, ctx, info, method, compute=None):
    trainers = len(method.trainers)
    who = f"{trainers} trainer(s)" + ("" if trainers == ctx.world_size else f" of {ctx.world_size} processes")
    line = (f"{method.name} ({method.description}): {who} ({ctx.backend}, {common.device_name(ctx.device)}), "
            f"{args.arch} on {info.describe()}, {info.steps} steps/epoch, batch {args.batch_size}/trainer")
    if args.accumulate > 1:
        line += f" x {args.accumulate} micro-batches a step (--accumulate: one exchange per step)"
    if compute:
        c = compute.summary()
        line += (f"; {c['label']}: {1e3 * c['modeled_compute_per_step']:.1f} ms forward+backward a step, the model "
                 f"running on {c['proxy_batch']} images at {c['proxy_image_size']} px")
    return line
