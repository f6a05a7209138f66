"""How the kit measures, the same way for every method: the step clock, an epoch's meter and record, exact
evaluation, the communication yardstick and the link counters (the loop that uses them: driver.Run and
driver.Epoch). Every number in
a results JSON comes from here: the scripts mark their step's phases on the clock, the exchange rooms declare
theirs with `phase`; docs/results_schema.md says what each one means.
"""
import collections
import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import common
from common import UserError, autocast, log
from data import to_device


# --------------------------------------------------------------------------- clocks and the epoch loop
def synchronize(device):
    """Waits for the device's queued work, so a host clock read after it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Per-step phase timer: CUDA events on GPU (no host sync until read), perf_counter on CPU.
    `begin()` starts a step; each `mark(name)` closes the phase `name` that ran since the previous mark."""

    current = None  # the latest clock made: a hang's report reads the phase its step was in (faults.py)

    def __init__(self, device):
        self.device, self.cuda, self.steps = device, device.type == "cuda", []
        StepClock.current = self

    def _stamp(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def begin(self):
        self.steps.append([("begin", self._stamp())])

    def mark(self, name):
        self.steps[-1].append((name, self._stamp()))

    def _seconds(self, a, b):
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def phase_sums(self, skip=0):
        """Total seconds of each phase over the steps after the first `skip`."""
        synchronize(self.device)
        sums = {}
        for marks in self.steps[skip:]:
            for (_, a), (name, b) in zip(marks, marks[1:]):
                sums[name] = sums.get(name, 0.0) + self._seconds(a, b)
        return sums

    def per_step(self, name, skip=0):
        """Seconds of phase `name` in each step after the first `skip` (a phase marked twice in a step adds up)."""
        synchronize(self.device)
        return [sum(self._seconds(a, b) for (_, a), (n, b) in zip(marks, marks[1:]) if n == name)
                for marks in self.steps[skip:]]

    def step_times(self, skip=0):
        """Seconds of each step after the first `skip`, from its begin to its last mark."""
        synchronize(self.device)
        return [self._seconds(marks[0][1], marks[-1][1]) for marks in self.steps[skip:] if len(marks) > 1]


class NoClock:
    """A clock that records nothing: for steps outside the epoch loop (the yardstick's)."""

    def mark(self, name):
        pass


def phase(name, after=None):
    """Declares an exchange's function one phase of the step, so that the exchange's code holds no timing: the
    step clock its first argument holds (`.clock`, given by the loop) closes the phase `after` on entry (what ran
    up to the call: a forward's compute before a wait for a pull) and `name` on return. Only calls on the main
    thread are timed: a communication thread runs beside the step, unclocked."""
    def declare(function):
        @functools.wraps(function)
        def timed(owner, *args, **kwargs):
            clock = getattr(owner, "clock", None) if threading.current_thread() is threading.main_thread() else None
            if clock is not None and after:
                clock.mark(after)
            result = function(owner, *args, **kwargs)
            if clock is not None:
                clock.mark(name)
            return result
        return timed
    return declare


def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None):
    """In-place reduction over `group` (a no-op outside a group or in a group of one)."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class Progress:
    """The reporting rank's progress: a tqdm bar on a terminal, else a plain line every --log-every steps."""

    def __init__(self, desc, total, enabled):
        from tqdm import tqdm
        self.desc, self.total, self.enabled, self.tty = desc, total, enabled, sys.stdout.isatty()
        self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stdout) \
            if enabled and self.tty else None

    def update(self, step, **values):
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(values)
        elif self.enabled:
            print(f"{self.desc} step {step}/{self.total} " + " ".join(f"{k} {v}" for k, v in values.items()),
                  flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


@dataclasses.dataclass
class EpochState:
    """What this rank's epoch has accumulated after `step` steps: enough to continue it after a restart with the
    same losses, counts and clocks (plain numbers: it travels in a checkpoint)."""
    epoch: int
    step: int = 0
    sums: list = dataclasses.field(default_factory=lambda: [0.0, 0.0])  # loss x images, correct
    seen: int = 0
    timed_seen: int = 0
    losses: list = dataclasses.field(default_factory=list)
    lrs: list = dataclasses.field(default_factory=list)
    elapsed: float = 0.0  # seconds of the loop so far, and of its timed steps
    timed: float = 0.0
    timed_steps: int = 0
    phases: dict = dataclasses.field(default_factory=dict)  # seconds per phase over the timed steps
    step_moments: list = dataclasses.field(default_factory=lambda: [0.0, 0.0])  # sum, sum of squares of steps
    compute_moments: list = dataclasses.field(default_factory=lambda: [0.0, 0.0])  # the same of "compute"


def epoch_record(ctx, group, done, steps, trainers):
    """The record of an epoch whose EpochState is `done`, every figure reduced over the trainers in `group`."""
    # Every rank reduces the same phases: a rank may have none of some (a sharded PS rank that owns no tensor never
    # updates), and tensors of different lengths would hang gloo's all-reduce.
    every = [sorted(done.phases)]
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        every = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, sorted(done.phases), group=group)
    names = sorted(set().union(*every))
    totals = torch.tensor([done.seen, done.timed_seen, done.elapsed, done.timed,
                           *(done.phases.get(k, 0.0) for k in names)],
                          dtype=torch.float64, device=ctx.device)
    slowest = all_reduce(totals[2:].clone(), dist.ReduceOp.MAX, group).tolist()
    seen, timed_seen, _, _, *phase_means = all_reduce(totals, group=group).tolist()
    loss_sum, correct = all_reduce(torch.tensor(done.sums, dtype=torch.float64, device=ctx.device), group=group).tolist()
    train_time, timed, n = slowest[0], slowest[1], done.timed_steps  # the epoch lasts until its slowest trainer
    return {
        "epoch": done.epoch, "train_loss": loss_sum / seen, "train_accuracy": 100.0 * correct / seen,
        "train_time": train_time, "train_throughput": timed_seen / timed, "avg_batch_time": timed / n,
        "avg_data_time": phase_means[names.index("data")] / trainers / n,
        "phase_times": {k: v / trainers / n for k, v in zip(names, phase_means)},
        "phase_times_max": {k: v / n for k, v in zip(names, slowest[2:])},
        "step_time_stdev": _stdev(*done.step_moments, n),
        "rank_compute": rank_compute(ctx, group, *done.compute_moments, n),
        "steps": steps, "warmup_steps": steps - n, "images_trained": int(seen),
        "all_losses": done.losses, "lrs": done.lrs,
    }


class EpochMeter:
    """How an epoch of training steps is measured, on this rank (driver.Epoch runs the steps and calls it): the
    step clock (`data` is the wait for the next batch, the method's marks name the rest); the loss and accuracy
    sums, kept on the device; every --log-every steps every trainer reads the group's sums (the same host sync on
    every rank, and a NaN anywhere stops them all) for the progress line; a `cold` process's first --warmup-steps
    steps (epoch 1, or the first epoch after a restart) left out of throughput and phase times; --profile's trace;
    the record, mean and max over the trainers of `group` (None: every rank). `state` (an EpochState from a
    checkpoint) continues an epoch from its step; `proxy` (a compute_model.ComputeModel): each proxy image counts
    as `proxy.weight` modeled images."""

    def __init__(self, ctx, args, epoch, steps, *, group=None, state=None, cold=None, proxy=None):
        self.ctx, self.args, self.epoch, self.steps, self.group, self.proxy = ctx, args, epoch, steps, group, proxy
        self.state = state = state or EpochState(epoch)
        self.first = first = state.step
        cold = epoch == 1 if cold is None else cold
        self.warmup = first + min(args.warmup_steps, steps - first - 1) if cold else first
        self.clock, self.lrs = StepClock(ctx.device), list(state.lrs)
        self.sums, self.losses = torch.tensor(state.sums, dtype=torch.float64, device=ctx.device), []
        self.seen, self.timed_seen = state.seen, state.timed_seen  # counts known on the host: no per-step copy
        reports = ctx.rank == common.first_rank(group)
        self.progress = Progress(f"epoch {epoch}", steps, reports)
        self.tracer = Tracer(args, ctx, self.warmup, steps) if args.profile and reports else None
        self.trainers = dist.get_world_size(group) if dist.is_initialized() else 1

    @contextlib.contextmanager
    def running(self):
        """Around the epoch's steps: the epoch's clock starts; the progress bar is closed at the end, before any
        error line, so that line starts clean."""
        try:
            synchronize(self.ctx.device)
            self.t_start = self.t_timed = time.perf_counter()
            yield
        finally:
            self.progress.close()

    def begin(self, step):
        """Before step `step`: the timed part starts after the warm-up, the trace where --profile says; the step
        clock begins the step."""
        if step == self.warmup > self.first:
            synchronize(self.ctx.device)
            self.t_timed = time.perf_counter()
        if self.tracer:
            self.tracer.at(step)
        self.clock.begin()

    def count(self, step, loss, logits, targets, lr):
        """Step `step`'s loss and accuracy into the sums, its learning rate into the record; the --log-every
        progress line."""
        self.lrs.append(lr)
        targets = torch.cat(targets) if isinstance(targets, list) else targets
        weight = self.proxy.weight if self.proxy else 1
        n = targets.numel() * weight
        self.sums += torch.stack([loss.detach().double() * n, (logits.argmax(1) == targets).sum().double() * weight])
        self.seen, self.timed_seen = self.seen + n, self.timed_seen + (n if step >= self.warmup else 0)
        self.losses.append(loss.detach())
        if (step + 1) % self.args.log_every == 0 or step + 1 == self.steps:
            loss_sum, correct = all_reduce(self.sums.clone(), group=self.group).tolist()
            check_finite(loss_sum, self.epoch, step)
            seen, rate = self.seen * self.trainers, (self.seen - self.state.seen) * self.trainers
            self.progress.update(step + 1, loss=f"{loss_sum / seen:.4f}", acc=f"{100 * correct / seen:.2f}%",
                                 img_s=f"{rate / (time.perf_counter() - self.t_start):.1f}")

    def snapshot(self, done):
        """The EpochState after `done` steps (a host sync)."""
        synchronize(self.ctx.device)
        now, state, skip = time.perf_counter(), self.state, self.warmup - self.first
        phases, times = self.clock.phase_sums(skip=skip), self.clock.step_times(skip=skip)
        compute = self.clock.per_step("compute", skip=skip)
        return EpochState(
            self.epoch, done, self.sums.tolist(), self.seen, self.timed_seen,
            state.losses + torch.stack(self.losses).float().tolist(), list(self.lrs),
            state.elapsed + now - self.t_start, state.timed + (now - self.t_timed if done > self.warmup else 0.0),
            state.timed_steps + len(times), {k: state.phases.get(k, 0.0) + phases.get(k, 0.0)
                                             for k in {*state.phases, *phases}},
            [a + b for a, b in zip(state.step_moments, (sum(times), sum(t * t for t in times)))],
            [a + b for a, b in zip(state.compute_moments, (sum(compute), sum(t * t for t in compute)))])

    def record(self):
        """The epoch's record after its last step, reduced over the trainers (every trainer calls it)."""
        if self.tracer:
            self.tracer.at(self.steps)
        record = epoch_record(self.ctx, self.group, self.snapshot(self.steps), self.steps, self.trainers)
        return {**record, **({"profile": self.tracer.summary} if self.tracer and self.tracer.summary else {})}


def next_step_batches(batches, ctx, args, proxy=None):
    """The next step's batch on the device (the proxy's with --compute-model); with --accumulate K, lists of its K
    micro-batches' images and targets."""
    pairs = []
    for _ in range(args.accumulate):
        images, targets = to_device(*next(batches), ctx, args)
        pairs.append(proxy.inputs(images, targets) if proxy else (images, targets))
    if args.accumulate == 1:
        return pairs[0]
    return [images for images, _ in pairs], [targets for _, targets in pairs]


def scaling_efficiency(record, overhead, trainers, args):
    """{"scaling_efficiency": measured throughput over trainers x the yardstick's no-communication throughput of
    one}, or {} without a yardstick."""
    if not overhead:
        return {}
    ideal = len(trainers) * args.batch_size * args.accumulate / overhead["local_step_time"]
    return {"scaling_efficiency": record["train_throughput"] / ideal}


def _stdev(total, squares, n):
    return math.sqrt(max(0.0, (squares - total * total / n) / (n - 1))) if n > 1 else None


STRAGGLER_FLOOR = 0.10  # a rank this much slower than the others (and beyond 4 standard errors) is named


def rank_compute(ctx, group, total, squares, n):
    """Each trainer's own compute per step (its "compute" phases: forward and backward, no waiting for others),
    gathered over the trainers, and the straggler: the slowest rank when its compute exceeds the median of the
    others' by more than STRAGGLER_FLOOR and by more than 4 standard errors of the difference; the others wait
    that difference every step."""
    mine = torch.tensor([total / n if n else 0.0, _stdev(total, squares, n) or 0.0], dtype=torch.float64,
                        device=ctx.device)
    ranks = dist.get_process_group_ranks(group) if dist.is_initialized() and group is not None else \
        list(range(dist.get_world_size() if dist.is_initialized() else 1))
    gathered = [torch.zeros_like(mine) for _ in ranks]
    if len(ranks) > 1:
        dist.all_gather(gathered, mine, group=group)
    else:
        gathered = [mine]
    means, stdevs = zip(*(t.tolist() for t in gathered))
    out = {"ranks": ranks, "compute": list(means), "stdev": list(stdevs), "steps": n,
           "median": statistics.median(means), "straggler": None}
    if len(ranks) > 1 and n > 1:
        slow = max(range(len(ranks)), key=lambda i: means[i])
        others = [m for i, m in enumerate(means) if i != slow]
        typical = statistics.median(others)
        spread = math.sqrt(stdevs[slow] ** 2 + statistics.median(
            [s for i, s in enumerate(stdevs) if i != slow]) ** 2) / math.sqrt(n)
        if means[slow] - typical > max(STRAGGLER_FLOOR * typical, 4 * spread):
            out["straggler"] = {"rank": ranks[slow], "compute": means[slow], "ratio": means[slow] / typical,
                                "cost_per_step": means[slow] - typical}
    return out


def check_finite(loss_sum, epoch, step):
    """Stops the run with a clear message when the loss is NaN or inf."""
    if not math.isfinite(loss_sum):
        raise UserError(f"training loss became {loss_sum} in epoch {epoch} by step {step + 1} "
                        "(lower --lr, add --lr-warmup-epochs, or try without --amp); finished epochs are kept")


@torch.no_grad()
def evaluate(model, loader, ctx, args, group=None, proxy=None):
    """Validation loss and accuracy over the whole val set, exact: every image counted exactly once. `proxy` (a
    compute_model.ComputeModel): the model sees the proxy of each batch, which stands for the whole batch."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss_sum, correct, count
    for images, targets in loader:
        images, targets = to_device(images, targets, ctx, args)
        count = targets.numel()
        if proxy:
            images, targets = proxy.inputs(images, targets)
        with autocast(args, ctx):
            logits = model(images)
        weight = count / targets.numel()
        sums += torch.stack([F.cross_entropy(logits.float(), targets, reduction="sum").double() * weight,
                             (logits.argmax(1) == targets).sum().double() * weight, torch.tensor(count).double()])
    model.train()
    loss_sum, correct, count = all_reduce(sums, group=group).tolist()
    if count != len(loader.dataset):
        raise RuntimeError(f"evaluated {count} images but the val set has {len(loader.dataset)}")
    return loss_sum / count, 100.0 * correct / count


# --------------------------------------------------------------------------- the communication yardstick
OVERHEAD_DEFINITION = (
    "overhead: the method's training step minus the same step with no communication at all (forward, backward "
    "and optimizer update on every trainer at once), on one fixed batch before epoch 1, in --overhead-pairs "
    "pairs after an untimed warm-up of each kind, the order alternating (ABBA), a barrier before each run of one "
    "kind, whose steps follow each other as in training; per trainer the median over pairs (min and max beside it), then the mean over trainers (and the max). "
    "stdev: per trainer the standard deviation of the pairs' differences, mean over trainers; se = 1.2533 x stdev "
    "/ sqrt(pairs), the standard error of the median (both null with one pair). "
    "share = overhead / step; scaling efficiency = throughput / (trainers x batch / local step). blocking: the "
    "same buckets synchronized after backward, so hidden_share = 1 - overhead / blocking overhead. Seconds.")


MEDIAN_SE = math.sqrt(math.pi / 2)  # the standard error of a median of n normal values: 1.2533 x stdev / sqrt(n)


def overhead_schedule(kinds, pairs, run_length=1):
    """[(kind, timed)]: each kind once untimed (warm-up), then `pairs` rounds in alternating order (ABBA), each
    kind `run_length` times in a row, the last one timed (2 when a step waits on the one before, as a PS pull
    waits for the server's previous update)."""
    plan = [(kind, False) for kind in kinds]
    for i in range(pairs):
        for kind in (kinds if i % 2 == 0 else kinds[::-1]):
            plan += [(kind, False)] * (run_length - 1) + [(kind, True)]
    return plan


def measure_overhead(ctx, args, steps, images, targets, *, group=None, run_length=1, flush=None):
    """Times `steps` = {"comm": fn, "local": fn, optionally "blocking": fn} (each fn(images, targets) one
    whole step) as `overhead_schedule` says; returns the JSON block. A barrier starts each run of one kind; the
    steps of a run follow each other as in training, so a step that waits for the one before (a PS pull, a
    pipelined exchange) is timed in its steady state; `flush()` ends a run's communication still in flight. The
    caller restores the training state (see `preserved`), so that training goes on as if this had not happened."""
    times = {kind: [] for kind in steps}
    member = not dist.is_initialized() or group is None or dist.get_rank() in dist.get_process_group_ranks(group)
    starts_run = True
    for kind, timed in overhead_schedule(list(steps), args.overhead_pairs, run_length):
        if starts_run and dist.is_initialized() and member:  # a server outside the trainers' group: unsynced
            dist.barrier(group=group)
        synchronize(ctx.device)
        start = time.perf_counter()
        steps[kind](images, targets)
        synchronize(ctx.device)
        if timed:
            times[kind].append(time.perf_counter() - start)
        starts_run = timed or run_length == 1
        if starts_run and flush:
            flush()
    local = times["local"]
    own = [statistics.median(times["comm"]), statistics.median(local)]
    for kind in ("comm", "blocking"):
        if kind in times:
            diffs = [a - b for a, b in zip(times[kind], local)]
            own += [statistics.median(diffs), min(diffs), max(diffs)]
    comm_diffs = [a - b for a, b in zip(times["comm"], local)]
    own.append(statistics.stdev(comm_diffs) if len(comm_diffs) > 1 else 0.0)  # last: the pairs' spread
    own = torch.tensor(own, dtype=torch.float64, device=ctx.device)
    slowest = all_reduce(own.clone(), dist.ReduceOp.MAX, group).tolist()
    mean = (all_reduce(own, group=group) / (dist.get_world_size(group) if dist.is_initialized() else 1)).tolist()
    out = {"definition": OVERHEAD_DEFINITION, "pairs": args.overhead_pairs, "run_length": run_length,
           "step_time": mean[0], "local_step_time": mean[1], "overhead": mean[2], "overhead_min": mean[3],
           "overhead_max": mean[4], "overhead_slowest_trainer": slowest[2], "overhead_share": mean[2] / mean[0],
           "overhead_stdev": mean[-1] if args.overhead_pairs > 1 else None,
           "overhead_se": MEDIAN_SE * mean[-1] / math.sqrt(args.overhead_pairs) if args.overhead_pairs > 1 else None}
    if "blocking" in times:
        out.update(blocking_overhead=mean[5], blocking_overhead_min=mean[6], blocking_overhead_max=mean[7],
                   hidden_share=1 - mean[2] / mean[5] if mean[5] > 0 else None)
    return out


@contextlib.contextmanager
def preserved(model, *stateful):
    """On exit puts back the parameters, buffers, gradients, RNG and each of `stateful` (anything with a
    state_dict: optimizer, GradScaler) exactly as they were: for steps that must leave no trace."""
    tensors = [*model.parameters(), *model.buffers()]
    saved = [t.detach().clone() for t in tensors]
    grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
    states = [copy.deepcopy(s.state_dict()) for s in stateful]
    rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)
            for p, g in zip(model.parameters(), grads):
                if g is None:
                    p.grad = None
                elif p.grad is not None and p.grad.shape == g.shape:
                    p.grad.copy_(g)  # in place: a gradient may be a view of a flat buffer
                else:
                    p.grad = g
        for s, state in zip(stateful, states):
            s.load_state_dict(state)
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])


def fixed_batch(args, info, ctx):
    """The yardstick's batch: random images of the training shape, the same on every rank."""
    g = torch.Generator().manual_seed(args.seed + 999)
    images = torch.randn(args.batch_size, 3, info.image_size, info.image_size, generator=g)
    targets = torch.randint(0, info.num_classes, (args.batch_size,), generator=g)
    return to_device(images, targets, ctx, args)


def yardstick_batch(args, info, ctx, compute=None):
    """The yardstick's fixed batch, as the model trains on it (through the --compute-model's proxy, if any)."""
    images, targets = fixed_batch(args, info, ctx)
    images, targets = compute.inputs(images, targets) if compute else (images, targets)
    k = args.accumulate  # a step of --accumulate K: K micro-batches, one exchange
    return (images, targets) if k == 1 else ([images] * k, [targets] * k)


def yardstick(args, ctx, info, method, compute=None):
    """The communication overhead of the method's step against its no-communication step (and its blocking
    one), on one fixed batch, leaving the training state exactly as it was. None on a rank that does not train."""
    clock, lr = NoClock(), common.lr_at(args, 0)
    kinds = ("comm", "local", "blocking") if method.overlaps else ("comm", "local")
    steps = {kind: (lambda x, y, kind=kind: method.step(x, y, clock, lr, kind)) for kind in kinds}
    with preserved(method.model, *stateful(method)):
        overhead = measure_overhead(ctx, args, steps, *yardstick_batch(args, info, ctx, compute),
                                    group=method.group, run_length=method.run_length, flush=method.flush)
    return overhead if ctx.rank in method.trainers else None


def record_yardstick(args, ctx, info, method, results, compute=None):
    """A fresh run's yardstick (driver.Run), into the results and the log (by the trainers; the first writes)."""
    overhead = yardstick(args, ctx, info, method, compute)
    if ctx.rank in method.trainers:
        results.update(comm_overhead=overhead)
        log(ctx, overhead_line(overhead, len(method.trainers)), rank=method.trainers[0])


def stateful(method):
    """A method's training state besides its model (optimizer, scaler, ...): what `preserved` puts back with it."""
    return [obj for obj in method.state.values() if obj is not method.model]


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


# --------------------------------------------------------------------------- network links
def network_info():
    """The network the run used when declared (emulate_cluster.sh declares its emulated links in KIT_NET_*
    variables), else None."""
    env = os.environ
    if not env.get("KIT_NET_RATE_BITS"):
        return None
    return {"emulated": bool(env.get("KIT_NET_TOPOLOGY")), "topology": env.get("KIT_NET_TOPOLOGY"),
            "nodes": int(env.get("KIT_NET_NODES", 1)), "procs_per_node": int(env.get("KIT_NET_PROCS_PER_NODE", 1)),
            "link_rate": env.get("KIT_NET_RATE"), "link_rate_bits": float(env["KIT_NET_RATE_BITS"]),
            "delay": env.get("KIT_NET_DELAY") or None,
            "server_nodes": int(env.get("KIT_NET_SERVER_NODES") or 0),  # the last nodes: the PS's, 1 process each
            "tcp_congestion_control": _read("/proc/sys/net/ipv4/tcp_congestion_control")}  # this node's (--tcp)


def _read(path):
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def read_link_bytes(ctx):
    """[sent, received] bytes so far on this node's link (its local rank 0 reads KIT_NET_IFNAME's counters,
    which emulate_cluster.sh sets; zeros elsewhere or without it)."""
    name = os.environ.get("KIT_NET_IFNAME")
    counts = [0.0, 0.0]
    if name and ctx.local_rank == 0:
        stats = Path("/sys/class/net") / name / "statistics"
        with contextlib.suppress(OSError, ValueError):
            counts = [float((stats / f).read_text()) for f in ("tx_bytes", "rx_bytes")]
    return torch.tensor(counts, dtype=torch.float64, device=ctx.device)


def busiest_link(ctx, before, steps):
    """Bytes per step sent and received through the busiest node link since `before` (a world collective)."""
    if not os.environ.get("KIT_NET_IFNAME"):
        return None
    sent, received = all_reduce((read_link_bytes(ctx) - before) / steps, dist.ReduceOp.MAX).tolist()
    return {"sent_bytes_per_step": sent, "received_bytes_per_step": received}


LINK_SAMPLE_S = 0.002  # the link meter's sampling period
LINK_GAP_S = 0.025  # a pause shorter than this between two samples that moved bytes is the same transfer
LINK_FLOOR_BYTES = 256  # less than this in a sample is control traffic (a store message, a few ACKs), not a transfer
LINK_ACK_SHARE = 0.1  # a direction carrying under this share of the other's bytes in a sample carries its ACKs
SLOW_LINK_FLOOR = 0.25  # a node whose link moved its bytes this much slower than the others' (and beyond noise)


class LinkMeter:
    """How long this node's link was busy, measured: on the node's local rank 0 (KIT_NET_IFNAME set), a thread
    reads the interface's byte counters every LINK_SAMPLE_S and counts a sample's interval as busy in a direction
    when bytes moved that way (at least LINK_FLOOR_BYTES, and not only the ACKs of the other direction's transfer).
    A pause under LINK_GAP_S between busy samples is counted busy: the counters move a packet (up to a 64 KB GSO
    segment) at a time, and the pause was its wire time. Per direction it sums the busy seconds and the bytes moved
    in them; `mark()` (after each step) keeps the sums, so an epoch has each node's per-step link time and rate
    (bytes / busy seconds) and their step-to-step spread (docs/faults.md, "The link meter")."""

    def __init__(self, ctx, period=LINK_SAMPLE_S):
        import threading
        self.ctx, self.period = ctx, period
        name = os.environ.get("KIT_NET_IFNAME")
        self.declared = bool(name)
        self.sums = (0.0,) * 6  # tx bytes, rx bytes, tx busy s, rx busy s, tx busy bytes, rx busy bytes
        self.marks, self._fds, self._stop = [], None, threading.Event()
        if name and ctx.local_rank == 0:
            stats = Path("/sys/class/net") / name / "statistics"
            with contextlib.suppress(OSError):
                self._fds = [os.open(stats / f, os.O_RDONLY) for f in ("tx_bytes", "rx_bytes")]
        if self._fds:
            self._thread = threading.Thread(target=self._run, name="kit-link-meter", daemon=True)
            self._thread.start()

    def _read(self):
        return [int(os.pread(fd, 32, 0)) for fd in self._fds]  # sysfs regenerates a value read at offset 0

    def _run(self):
        try:
            before, t0 = self._read(), time.perf_counter()
            last = [None, None]  # per direction: when its latest busy sample ended
            while not self._stop.wait(self.period):
                now, t1 = self._read(), time.perf_counter()
                d, s, busy = [a - b for a, b in zip(now, before)], self.sums, [0.0, 0.0]
                for i in (0, 1):
                    if d[i] >= LINK_FLOOR_BYTES and d[i] >= LINK_ACK_SHARE * d[1 - i]:
                        # the counters move a packet (a 64 KB GSO segment) at a time: a short pause is its wire time
                        joined = last[i] is not None and t0 - last[i] <= LINK_GAP_S
                        busy[i], last[i] = t1 - (last[i] if joined else t0), t1
                self.sums = (s[0] + d[0], s[1] + d[1], s[2] + busy[0], s[3] + busy[1],
                             s[4] + d[0] * (busy[0] > 0), s[5] + d[1] * (busy[1] > 0))  # one assignment: read whole
                before, t0 = now, t1
        except (OSError, ValueError):
            self._fds = None

    def start_epoch(self):
        """Before an epoch's steps: its link counters (read_link_bytes) and the meter's sums so far."""
        self.before = read_link_bytes(self.ctx)
        self.marks = [self.sums]

    def end_epoch(self, steps):
        """After the epoch's `steps` steps (world collectives: every rank calls it): {"link": the busiest node
        link's bytes per step, "node_links": each node's link time and rate (epoch)}."""
        self.mark()
        link = busiest_link(self.ctx, self.before, steps)
        return {"link": link, "node_links": self.epoch(self.ctx.rank // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))}

    def mark(self):
        """After a step: keeps the sums so far (cheap: a tuple)."""
        self.marks.append(self.sums)

    def close(self):
        self._stop.set()

    def epoch(self, group_rank=None):
        """The epoch's node_links record (a world collective: every rank calls it), or None off a declared
        network: per node its bytes and busy seconds per step each way, its rate (the faster direction's bytes /
        busy seconds: the link moved at least that) and that rate's step-to-step stdev, and the slow link."""
        if not self.declared:
            return None
        node = int(os.environ.get("GROUP_RANK", group_rank if group_rank is not None else 0))
        steps = [[b - a for a, b in zip(m0, m1)] for m0, m1 in zip(self.marks, self.marks[1:])]
        n = len(steps)
        total = [sum(col) for col in zip(*steps)] if steps else [0.0] * 6

        def rate(s):  # bytes/s of the faster direction (0 when the link carried nothing)
            return max([s[4 + i] / s[2 + i] for i in (0, 1) if s[2 + i] > 0], default=0.0)
        rates = [rate(s) for s in steps if s[2] > 0 or s[3] > 0]
        mine = torch.tensor([1.0 if self._fds else 0.0, node, n, *total, rate(total),
                             statistics.stdev(rates) if len(rates) > 1 else 0.0],
                            dtype=torch.float64, device=self.ctx.device)
        gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size() if dist.is_initialized() else 1)]
        if len(gathered) > 1:
            dist.all_gather(gathered, mine)
        else:
            gathered = [mine]
        rows = sorted((r for r in (t.tolist() for t in gathered) if r[0]), key=lambda r: r[1])
        if not rows:
            return None
        per = lambda r, i: r[3 + i] / r[2] if r[2] else 0.0  # noqa: E731
        out = {"nodes": [int(r[1]) for r in rows], "steps": [int(r[2]) for r in rows],
               "sent_bytes_per_step": [per(r, 0) for r in rows], "received_bytes_per_step": [per(r, 1) for r in rows],
               "busy_sent_s_per_step": [per(r, 2) for r in rows], "busy_received_s_per_step": [per(r, 3) for r in rows],
               "rate": [r[9] for r in rows], "rate_stdev": [r[10] for r in rows], "sample_period": self.period,
               "slow": None}
        out["link_time_per_step"] = [max(a, b) for a, b in zip(out["busy_sent_s_per_step"],
                                                                 out["busy_received_s_per_step"])]
        out["slow"] = slow_link(out)
        return out


def slow_link(rec):
    """The slow link of a node_links record: the node whose rate is the lowest, when the others' median rate exceeds
    it by more than SLOW_LINK_FLOOR of theirs and by more than 4 standard errors of the difference; its cost per
    step = its bytes per step (the larger direction's) at its rate minus the same bytes at the others' rate."""
    rates, n = rec["rate"], len(rec["nodes"])
    if n < 2 or min(rec["steps"]) < 2 or not all(r > 0 for r in rates):
        return None
    slow = min(range(n), key=lambda i: rates[i])
    others = [r for i, r in enumerate(rates) if i != slow]
    typical = statistics.median(others)
    spread = math.sqrt(rec["rate_stdev"][slow] ** 2 + statistics.median(
        [s for i, s in enumerate(rec["rate_stdev"]) if i != slow]) ** 2) / math.sqrt(rec["steps"][slow])
    if typical - rates[slow] <= max(SLOW_LINK_FLOOR * typical, 4 * spread):
        return None
    moved = max(rec["sent_bytes_per_step"][slow], rec["received_bytes_per_step"][slow])
    return {"node": rec["nodes"][slow], "rate": rates[slow], "others_rate": typical, "ratio": typical / rates[slow],
            "bytes_per_step": moved, "link_time_per_step": rec["link_time_per_step"][slow],
            "cost_per_step": moved / rates[slow] - moved / typical}


# --------------------------------------------------------------------------- the profiler
COMM_NAMES = ("nccl", "gloo", "c10d::", "broadcast", "allreduce", "all_reduce", "reduce_", "send", "recv")


class Tracer:
    """--profile N: traces N steps after the warm-up with torch.profiler, writes a Chrome/Perfetto trace next to
    the results and measures from it how much of the communication overlapped compute: NCCL kernels against the
    other kernels on a GPU; on a CPU, gloo's operations (in gloo's threads) against the training thread's ops."""

    def __init__(self, args, ctx, first, steps):
        self.first, self.last = first, min(steps, first + args.profile)
        self.path = Path(args.output).with_name(f"trace_{Path(args.output).stem}.json")
        self.cuda, self.summary, self.profiler = ctx.device.type == "cuda", None, None

    def at(self, step):
        """Called before each step (and with the step count at the end): starts and stops the trace."""
        if step == self.first and self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if self.cuda else [])
            self.profiler = torch.profiler.profile(activities=activities)
            with self._quiet():
                self.profiler.start()
        elif step == self.last and self.profiler is not None and self.summary is None:
            with self._quiet():
                self.profiler.stop()
            self.profiler.export_chrome_trace(str(self.path))
            self.summary = {"trace": str(self.path), "steps": self.last - self.first, **trace_overlap(self.path)}
            print(f"profile: {self.summary['steps']} steps traced to {self.path}: "
                  f"{1e3 * self.summary['comm_time']:.1f} ms of communication "
                  f"({self.summary['comm_source']}), {100 * self.summary['overlap_share']:.0f}% of it overlapping "
                  f"compute", flush=True)


    @contextlib.contextmanager
    def _quiet(self):
        """On a CPU, the profiler's native library (a CUDA build's) prints its start and stop markers and
        "ERROR: ... gpuGetDeviceCount failed", which is not an error there: its output is dropped around them."""
        if self.cuda:
            yield
            return
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(fd) for fd in (1, 2)]
        with open(os.devnull, "w") as null:
            for fd in (1, 2):
                os.dup2(null.fileno(), fd)
            try:
                yield
            finally:
                for fd, kept in zip((1, 2), saved):
                    os.dup2(kept, fd)
                    os.close(kept)


def trace_overlap(path):
    """From a Chrome trace: seconds of communication, and the share of it that ran while compute ran."""
    events = [e for e in json.loads(Path(path).read_text())["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    if kernels:  # GPU: communication and compute kernels
        comm = [e for e in kernels if "nccl" in e["name"].lower()]
        compute = [e for e in kernels if "nccl" not in e["name"].lower()]
        source = "NCCL kernels against compute kernels"
    else:  # CPU: gloo's operations run in gloo's threads; compute is the training thread's aten ops
        comm = [e for e in events if e["name"].startswith("gloo:")]
        main = collections.Counter(e["tid"] for e in events if e["name"].startswith("aten::")).most_common(1)
        compute = [e for e in events if main and e["tid"] == main[0][0] and e["name"].startswith("aten::")
                   and not any(n in e["name"] for n in COMM_NAMES)]
        source = "gloo operations against the training thread's ops (on shared CPU cores)"
    comm_spans, compute_spans = _union(comm), _union(compute)
    total = sum(b - a for a, b in comm_spans)
    overlapped = sum(max(0.0, min(b, d) - max(a, c)) for a, b in comm_spans for c, d in compute_spans)
    return {"comm_time": total / 1e6, "overlapped_time": overlapped / 1e6,
            "overlap_share": overlapped / total if total else 0.0, "comm_source": source}


def _union(events):
    """Disjoint (start, end) microsecond intervals covering `events`."""
    spans = []
    for start, end in sorted((e["ts"], e["ts"] + e["dur"]) for e in events):
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([start, end])
    return spans
