"""--sync pipelined: each partition's exchange hidden behind the next forward, its update applied there (P3,
ByteScheduler), in an order every rank agrees on."""
import collections
import queue
import threading

import torch
import torch.distributed as dist

import common
import measure
from sync.allreduce import GradSync
from sync.buckets import record_event, run_jobs, sgd_step


def next_partition(remaining, ready_everywhere):
    """The partition whose exchange starts next (pipelined), from what every rank knows: among those ready on every
    rank, the one the next forward needs first (the highest index: buckets hold the parameters in reverse), else the
    next one backward fills (the lowest index left), which a rank then waits for."""
    ready = remaining & ready_everywhere
    return max(ready) if ready else min(remaining)


class _AllReduceJob:
    """One step's exchange (pipelined): the partitions this rank's backward has filled, each started exchange's
    (work, wire) and the order they started in, the partitions updated, the step's learning rate (in a loop of its
    own: each group's when backward ended, and the stand-ins' window), its parameters without a gradient (_Unused)."""

    def __init__(self, count, lr):
        self.lr, self.ready, self.events, self.works = lr, [False] * count, [None] * count, [None] * count
        self.order, self.applied, self.unused, self.window = [], set(), None, None


def _optimizer_step(optimizer, scaler, params, lr):
    """The update of `params` at the step's learning rate `lr` (a list, one per group: a loop of its own's)."""
    if scaler.is_enabled():  # every partition is here: one inf check, one step
        groups = optimizer.param_groups
        now = [group["lr"] for group in groups]
        for group, step_lr in zip(groups, lr if isinstance(lr, list) else [lr] * len(groups)):
            group["lr"] = step_lr
        scaler.step(optimizer)
        scaler.update()
        for group, step_lr in zip(groups, now if isinstance(lr, list) else ()):
            group["lr"] = step_lr  # a loop of its own: its scheduler's learning rate for the next step
    else:
        sgd_step(optimizer, params, lr)


class _Exchanges:
    """PipelinedSync's exchanges, in an order every rank agrees on: every rank must start the same collectives in the
    same order, but which partition is ready when is each rank's own, so the order is decided only from what every rank
    knows. Each exchange carries, after the gradients, a readiness vector: 1 for every partition this rank's backward
    had filled when the exchange started, summed by the same all-reduce, so when an exchange ends every rank holds the
    same counts. Exchange n is chosen when exchange n - credit has ended (at most `credit` in flight), from the vectors
    of the exchanges ended by then (the same on every rank): next_partition's rule. The first exchange of a step knows
    nothing yet: partition 0. A communication thread decides, starts and ends the exchanges, on a process group of its
    own, so the training thread's collectives (buffers, the loss sums, validation) never interleave with them. The
    gradient hook (_full) tells the thread that a partition is full; the training thread waits in _receive for the
    partitions it updates."""

    def _full(self, i):  # in the gradient hook (autograd's thread)
        event = record_event(self.device)  # the communication thread's stream waits for it
        with self.changed:
            self.job.events[i], self.job.ready[i] = event, True
            self.changed.notify_all()

    def _exchange(self, job):
        """The communication thread's work for one step (run_jobs): every partition's exchange, in the agreed order."""
        remaining, everywhere, flights = set(range(len(self.buckets))), set(), collections.deque()
        while remaining:
            if len(flights) == self.credit:
                everywhere |= self._land(*flights.popleft())
            b = next_partition(remaining, everywhere)
            with self.changed:
                self.changed.wait_for(lambda: job.ready[b])
                flags = [float(r) for r in job.ready]
            remaining.discard(b)
            flights.append(self._start(job, b, flags))
        while flights:
            self._land(*flights.popleft())

    def _start(self, job, b, flags):
        bucket = self.buckets[b]
        if job.events[b] is not None:
            torch.cuda.current_stream().wait_event(job.events[b])
        bucket.tail.copy_(torch.tensor(flags))
        work, wire, _ = self._all_reduce(bucket, async_op=True)
        with self.changed:
            job.works[b] = work, wire
            job.order.append(b)
            self.changed.notify_all()
        return work, wire

    def _land(self, work, wire):
        """Waits for an exchange; the partitions its readiness vector says were ready on every rank."""
        work.wait()
        counts = wire[-len(self.buckets):].tolist()
        return {i for i, n in enumerate(counts) if n > self.world_size - 0.5}

    @measure.phase("comm", after="compute")
    def _receive(self, job, parts):
        """Waits for the exchanges of `parts` (the step's "comm"; what ran before, its "compute"); their averages into
        the buckets."""
        for b in parts:
            with self.changed:
                self.changed.wait_for(lambda: job.works[b] is not None or self.error is not None)
            if self.error is not None:
                raise self.error
            work, wire = job.works[b]
            work.wait()
            bucket = self.buckets[b]
            if wire is not bucket.flat:
                bucket.grads.copy_(wire[:bucket.grads.numel()])
                if wire.is_cuda:
                    wire.record_stream(torch.cuda.current_stream())  # made on the thread's stream, read here


class _StandIns:
    """PipelinedSync in a loop of its own: between backward and the update .grad points at stand-ins, and what the
    loop did to them is done to the gradients after the update (PipelinedSync's docstring)."""

    def _open_window(self, job):
        """.grad points at stand-ins until the update (see PipelinedSync's docstring); _settle reads them."""
        if self.stand_ins is None:
            self.stand_ins = [torch.empty_like(p) for p in self.params]
        job.window = {}
        for p, stand_in in zip(self.params, self.stand_ins):
            job.window[id(p)] = stand_in, stand_in._version
            p.grad = stand_in

    def _step_grads(self, job, params):
        """Points .grad at the step's averaged gradients for the update (None for a parameter unused everywhere, as
        under DDP); returns what the loop had left in .grad, or None where nothing needs to change (the kit's loop)."""
        if job.window is None and (job.unused is None or not job.unused.unset):
            return None
        left = {id(p): p.grad for p in params}
        for p in params:
            view = self.views[id(p)]
            p.grad = view if job.unused is None else job.unused.grad_of(p, view)
        return left

    @staticmethod
    def _settle(job, params, left):
        """After the update: what the loop did to the stand-ins since backward, done to the gradients."""
        for p in params if job.window is not None else ():
            stand_in, version = job.window[id(p)]
            if left[id(p)] is not stand_in:
                p.grad = left[id(p)]  # set to None, or to a tensor of the loop's
            elif stand_in._version != version and p.grad is not None:
                p.grad.zero_()  # zeroed in place (zero_grad(set_to_none=False))


class PipelinedSync(_Exchanges, _StandIns, GradSync):
    """--sync pipelined (P3, ByteScheduler): the buckets are partitions of <= --bucket-mb, each all-reduced as backward
    fills it and its parameters updated when its exchange has ended: SGD's update is per parameter, so this is the
    same math as one optimizer.step(). An overlapped step returns with exchanges in flight; the next forward waits,
    in a forward pre-hook of each module, only for the partitions holding that module's parameters, and applies their
    update there (on a GPU the wait holds back the training stream, not the host). flush() ends them all. The order
    of the exchanges, which every rank agrees on, and the thread that starts them: _Exchanges.

    fp16 (a GradScaler): the scaler's one inf check needs every gradient, so the next forward's first module waits
    for every partition, then scaler.step(optimizer) and scaler.update() run as in the other modes: with fp16 the
    exchange hides behind backward and the step boundary, not behind the next forward.

    In a loop of its own (docs/own_loop.md) the sync owns the update: the loop calls no optimizer.step() (at the
    optimizer's lr), and sync.flush() after its last step. Between backward and the next forward the buckets are
    still on the wire, so .grad points at stand-ins (one more copy of the gradients' memory, made once): what the
    loop does to them tells the update's end what to leave in .grad (nothing: the average, which the next backward
    accumulates on; zeroed in place: zeros; set to None: None). no_sync() works as in the other modes: its
    backwards start by taking in the update still due. With find_unused_parameters, a partition whose modules did
    not run in the next forward is updated when the next backward starts (or by flush)."""
    pipelined = True

    def __init__(self, model, optimizer, scaler=None, bucket_mb=25.0, compress="none", credit=2, **contract):
        super().__init__(model, "pipelined", bucket_mb, compress, **contract)
        scaler = scaler or torch.amp.GradScaler(self.device.type, enabled=False)
        self.optimizer, self.scaler, self.credit, self.stand_ins = optimizer, scaler, credit, None
        self.group = dist.new_group(list(range(self.world_size)))
        self.job = self.pending = None  # this step's exchange; the one before, which this forward consumes
        self.early = None  # the buffers' broadcast started at the end of the last forward
        self.clock, self.error, self.last_order = measure.NoClock(), None, []
        self.changed, self.jobs = threading.Condition(), queue.Queue()
        everything = range(len(self.buckets))
        for module in model.modules():
            needs = sorted({self.bucket_index[id(p)] for p in module.parameters(recurse=False)
                            if id(p) in self.bucket_index}, reverse=True)
            if needs:
                needs = everything if scaler.is_enabled() else needs
                module.register_forward_pre_hook(lambda m, a, needs=needs: self._before_forward(needs))
        # _exchange looked up per job, as a test that holds the exchanges back replaces it after construction
        threading.Thread(target=run_jobs, args=(self, self.jobs, lambda job: self._exchange(job)), daemon=True).start()

    def _tail(self, count, params):
        return count  # the readiness vector

    def begin(self, clock=None, lr=None, *, communicate=True, overlap=True):
        super().begin(clock or measure.NoClock(), lr, communicate=communicate, overlap=overlap)
        if self.overlapped:  # this step's exchange runs on into the next forward
            self.pending, self.job = self.job, _AllReduceJob(len(self.buckets), lr)
            self.last_order = self.job.order
            self.jobs.put(self.job)
        else:
            self.flush()  # no exchange, or one after backward: the step starts with nothing in flight

    def _take_in(self):
        """Before gradients are touched again, the update the last forward took in must be complete: a partition it
        did not ask for has a parameter used outside the forward of a module holding it, so used stale: an error;
        unless find_unused_parameters, where its modules may have sat out the forward: updated now."""
        if self.pending is None:
            return
        if not self.find_unused_parameters:
            left = [self.names[id(p)] for b in range(len(self.buckets)) if b not in self.pending.applied
                    for p in self.buckets[b].tensors]
            raise common.UserError(f"--sync pipelined: parameter {left[0]} was used before its update arrived (each "
                                   "parameter must be used in the forward of the module that holds it, or pass "
                                   "find_unused_parameters=True; use --sync overlap)")
        self._apply(self.pending, range(len(self.buckets)))
        self.pending = None

    def _backward_starts(self):
        super()._backward_starts()
        self._take_in()
        if self.syncing and not self.driven:  # a loop of its own: this backward's exchange
            self.job = _AllReduceJob(len(self.buckets), None)
            self.last_order = self.job.order
            self.jobs.put(self.job)

    def zero_grad(self):
        self._take_in()
        if self.overlapped:
            # The forward is over, so rank 0's buffers are already those the next forward starts from (backward and
            # the update leave them alone): their broadcast starts now, while the link is free, not behind the
            # exchange at the next step's start.
            self.early = [dist.broadcast(buffer.pack(), src=0, async_op=True) for buffer in self.buffers]
        super().zero_grad()

    def broadcast_buffers(self):
        if self.early is None:
            return super().broadcast_buffers()
        for work in self.early:
            work.wait()
        self.early = None
        for buffer in self.buffers if dist.get_rank() != 0 else ():
            buffer.unpack()

    def _finish(self):
        if not self.overlapped:
            return super()._finish()
        self.job.unused = self._end_backward()  # the exchanges run on into the next forward
        if not self.driven:  # the learning rates of this step, whatever a scheduler does before the update
            self.job.lr = [group["lr"] for group in self.optimizer.param_groups]
            self.pending, self.job = self.job, None
            self._open_window(self.pending)

    def flush(self, clock=None):
        """Ends every exchange in flight and applies its update (inside `clock` when given: the epoch's last step)."""
        self.clock = clock or self.clock
        for job in (self.pending, self.job):
            if job is not None:
                self._apply(job, range(len(self.buckets)))
        for work in self.early or ():  # the next step broadcasts the buffers as they are then
            work.wait()
        self.pending = self.job = self.early = None

    def _before_forward(self, needs):
        if self.pending is not None and self.overlapped:
            self._apply(self.pending, needs)
            if len(self.pending.applied) == len(self.buckets):
                self.pending = None

    def _apply(self, job, parts):
        """Waits for the exchanges of `parts` and updates their parameters (each partition once)."""
        parts = [b for b in parts if b not in job.applied]
        if not parts:
            return
        self._receive(job, parts)
        self._update(job, parts)

    @measure.phase("update")
    def _update(self, job, parts):
        """The update of the parameters of `parts`, whose exchanges have landed."""
        params = [p for b in parts for p in self.buckets[b].tensors]
        left = self._step_grads(job, params)
        with torch.autocast(self.device.type, enabled=False):
            _optimizer_step(self.optimizer, self.scaler, params, job.lr)
        if left is not None:
            self._settle(job, params, left)
        job.applied.update(parts)
