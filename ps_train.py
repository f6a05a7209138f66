"""Parameter server: rank 0 holds the parameters and the optimizer, ranks 1..N-1 compute gradients.

    torchrun --nproc_per_node=4 ps_train.py --epochs 3 --batch-size 64 --workers 16 --data-dir ./ --backend nccl

Sync strategy: synchronous PS. Each step every worker pulls the server's parameters, computes gradients on its
own shard and pushes them; the server averages them, takes the optimizer step and serves the result.
--comm chooses how pulls and pushes travel:
  p2p         the guide's original: one dist.send / dist.recv per tensor and per worker (a star).
  collective  (default) the guide's improvement: tensors packed into --bucket-mb flat buffers; pull =
              dist.broadcast from the owner, push = dist.reduce(SUM) to it; all buckets in flight at once.
  overlap     collective, BytePS-style: each gradient bucket is pushed (async reduce) from gradient hooks as
              soon as backward has filled it; the pull is launched async and each module's forward waits, in a
              pre-hook, only for the bucket holding its own tensors.
  pipelined   BytePS's push-sum-pull per partition (partitions of <= --bucket-mb, default 4 MiB): each is pushed
              point-to-point to its owner as soon as backward has filled it, updated by its owner as soon as every
              push to it has arrived, and pulled back in the order the next forward needs it, whose modules wait
              for their own partitions; the step ends with its exchange in flight (Pipelined).
--servers all shards the server: every rank trains AND owns a slice of the parameters (whole tensors, contiguous
in the order backward produces them, balanced by bytes, so pushes can start early; pipelined: whole partitions,
dealt out balanced so that consecutive ones have different owners), with its optimizer state; each bucket travels
between its owner and the others, so every link carries ~2(N-1)/N of the model per step instead of 2(N-1) models
through one server's link. With one server, pipelined is the same exchange on a star: the server owns every
partition. --mode async: one server applies each worker's gradient as it arrives (with lr / workers, so a round of
updates moves as far as one synchronous step) and every worker pulls the newest parameters; staleness = server
updates between a worker's pull and its push. The async server is full duplex: it sends one worker's pull while
it receives another's push (Async).
BatchNorm: workers push their running statistics with their gradients; the owner keeps the mean (async: of each
worker's latest) and serves it with the parameters, so every worker holds, and validates, the same model; the
server validates its share of the val set too. fp16 (one server, sync, not pipelined): the server owns the
GradScaler and serves its scale with the parameters; workers push scaled gradients; the server averages, unscales
once, skips the step on inf/NaN for everyone and adjusts the scale.
Writes results_ps.json (--comm collective) or results_ps_<comm>[_sharded][_async].json unless --output is given.
"""
import dataclasses
import queue
import threading
import time

import torch
import torch.distributed as dist
import torch.nn as nn

import common
import data
import driver
import measure
from all_reduce_train import adopt_grad, sgd_step  # DDP's gradient-view rule; torch's SGD step for some parameters
from modes import DEFAULT_BUCKET_MB, PARTITION_MB, PS_COMMS, PS_MODES, PS_SERVERS, variant_output

SERVER = 0
COMMS = PS_COMMS  # the first is the default


def output_name(args):
    suffix = ("_sharded" if args.servers == "all" else "") + ("_async" if args.mode == "async" else "")
    return variant_output("ps", args.comm, COMMS[0]).replace(".json", suffix + ".json")


def parse_args(argv=None):
    p = common.make_parser(__doc__, output_name)
    p.add_argument("--comm", choices=COMMS, default=COMMS[0], help="how parameters and gradients travel")
    p.add_argument("--bucket-mb", type=common.positive(float), default=None,
                   help=f"flat-buffer size in MiB (default {DEFAULT_BUCKET_MB:g}); --comm pipelined: the partition "
                        f"size (default {PARTITION_MB:g})")
    p.add_argument("--servers", choices=PS_SERVERS, default=PS_SERVERS[0],
                   help="1: rank 0 serves, the others train; all: every rank trains and serves a shard")
    p.add_argument("--mode", choices=PS_MODES, default=PS_MODES[0],
                   help="async: the server applies each gradient as it arrives (one server, its own exchange)")
    args = common.parse(p, argv)
    if args.bucket_mb is None:
        args.bucket_mb = PARTITION_MB if args.comm == "pipelined" else DEFAULT_BUCKET_MB
    if args.comm == "p2p" and args.channels_last:
        p.error("--comm p2p sends each tensor as it is and needs contiguous tensors (drop --channels-last "
                "or use --comm collective)")
    if args.mode == "async" and (args.servers != "1" or args.comm != COMMS[0]):
        p.error("--mode async has one server and its own exchange, one packed message each way per step "
                "(drop --servers and --comm)")
    if args.amp and args.amp_dtype == "fp16" and (args.mode == "async" or args.servers == "all"):
        p.error("fp16 loss scaling needs the single synchronous server (use --amp-dtype bf16)")
    if args.amp and args.amp_dtype == "fp16" and args.comm == "pipelined":
        p.error("fp16 loss scaling checks every gradient before any update, which --comm pipelined updates one "
                "partition at a time (use --amp-dtype bf16, or --comm collective, p2p or overlap)")
    return args


# --------------------------------------------------------------------------- the algorithm, one step on each side
def server_step(comm, optimizer, scaler, lr, clock):
    """The single server's step: serve the parameters, gather the workers' gradients, average them, update."""
    serve(comm, scaler)
    clock.mark("serve")
    comm.push()
    clock.mark("push_wait")  # includes the workers' forward and backward
    update(comm, optimizer, scaler, lr, len(comm.trainers))
    clock.mark("update")


def serve(comm, scaler):
    """The server: puts the loss scale (1 without fp16) into the served state, then serves a pull."""
    comm.layout.scale.copy_(scaler.scale(torch.ones((), device=comm.layout.scale.device)))
    comm.pull()
    comm.finish_pull()


def update(comm, optimizer, scaler, lr, trainers):
    """An owner: averages the sums pushed to it and steps its optimizer (fp16: unscales once, skips on inf)."""
    comm.layout.average(comm.rank, trainers)
    common.set_lr(optimizer, lr)
    scaler.step(optimizer)
    scaler.update()


def make_worker_step(model, comm, args, ctx, optimizer=None, scaler=None):
    """A worker's step: pull, forward and backward, push; with --servers all also the update of its own shard
    (`optimizer`, at `lr`; otherwise the lr is the server's business). kind "local": the same forward and
    backward and an SGD step on every parameter here, nothing exchanged (the yardstick's no-communication step,
    while the servers wait); "blocking": the same buckets exchanged blocking after backward (overlap: by the
    collective transport; pipelined: its partitions, the whole exchange inside the step)."""
    criterion = nn.CrossEntropyLoss()
    blocking = comm.blocking_twin() if comm.overlaps else None
    local = {}

    def train_step(images, targets, clock, lr=None, kind="comm"):
        if kind != "comm":
            comm.flush()  # the other kinds start with nothing in flight
        comm.active = kind == "comm"  # the overlapped transports' hooks stay quiet in the other kinds
        try:
            return local_step(images, targets) if kind == "local" else \
                exchange_step(images, targets, clock, lr, blocking if kind == "blocking" else comm)
        finally:
            comm.active = True

    def exchange_step(images, targets, clock, lr, via):
        via.clock, via.lr = clock, lr
        via.pull()
        clock.mark("pull")
        with common.autocast(args, ctx):
            logits = model(images)  # overlap: each module first waits for its own pull bucket
            loss = criterion(logits, targets)
        via.finish_pull()
        clock.mark("compute")
        comm.layout.zero_grad()
        (loss * comm.layout.scale).backward()  # overlap: the gradient hooks push buckets while backward runs
        clock.mark("compute")
        via.push()  # pipelined: returns with the exchange (and the owners' updates) in flight
        clock.mark("push")
        if optimizer is not None and not via.updates_itself:
            update(via, optimizer, scaler, lr, len(comm.trainers))
            clock.mark("update")
        return loss, logits

    def local_step(images, targets):
        if not local:
            local.update(opt=common.make_optimizer(args, model.parameters()), scaler=common.make_scaler(args, ctx))
        with common.autocast(args, ctx):
            logits = model(images)
            loss = criterion(logits, targets)
        comm.layout.zero_grad()
        local["scaler"].scale(loss).backward()
        local["scaler"].step(local["opt"])
        local["scaler"].update()
        return loss, logits

    return train_step


# --------------------------------------------------------------------------- what travels, and who owns it
class Bucket(common.FlatBuffer):
    """A float32 flat buffer that one rank owns: the server's, or with sharding the rank owning its tensors. A push
    bucket's first `grads` tensors are parameters whose gradients are views of it; the rest are buffers, copied in
    before a push (pack_buffers) and out after the average (unpack_buffers)."""

    def __init__(self, tensors, owner, grads=0):
        super().__init__(tensors, torch.float32)
        self.owner, self.grads = owner, grads

    @torch.no_grad()
    def pack_buffers(self):
        if self.grads < len(self.tensors):
            torch._foreach_copy_(self.views[self.grads:], self.tensors[self.grads:])

    @torch.no_grad()
    def unpack_buffers(self):
        if self.grads < len(self.tensors):
            torch._foreach_copy_(self.tensors[self.grads:], self.views[self.grads:])


class Layout:
    """The state as served (parameters and buffers in module order, so one module's tensors share a bucket,
    then the fp16 loss scale) and as pushed (gradients in the order backward produces them, then buffers), cut
    into buckets with an owner each. Gradients are views of the push buckets: on an owner one division per
    bucket averages them, on a worker backward writes straight into what is pushed."""

    def __init__(self, model, bucket_mb, owner_of=None):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buffers = list(model.buffers())
        owner_of = owner_of or {}
        module_owner = {id(t): owner_of.get(id(next(m.parameters(recurse=False), None)), SERVER)
                        for m in model.modules() for t in m.buffers(recurse=False)}  # a buffer goes with its module
        self.owner = {**{id(p): owner_of.get(id(p), SERVER) for p in self.params}, **module_owner}
        self.scale = torch.ones((), device=self.params[0].device)  # 1 unless the server's GradScaler says
        self.owner[id(self.scale)] = SERVER
        served = [t for m in model.modules() for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))]
        cap = bucket_mb * 2 ** 20
        self.pull = self._buckets(served + [self.scale], cap)
        self.grad_buckets = self._buckets(self.params[::-1], cap, grads=True)
        self.buffer_buckets = self._buckets(self.buffers, cap)
        self.push = self.grad_buckets + self.buffer_buckets
        self._grads_into_push_buckets()

    def _grads_into_push_buckets(self):
        # A gradient set to None (optimizer.zero_grad()) or replaced is copied back into its view by a hook that runs
        # before the transports' own, as DDP's reducer does: what is pushed is always what backward made.
        for bucket in self.grad_buckets:
            for p, view in zip(bucket.tensors[:bucket.grads], bucket.views):
                p.grad = view
                p.register_post_accumulate_grad_hook(lambda p, view=view: adopt_grad(p, view))

    def _buckets(self, tensors, cap, grads=False):
        """Runs of one owner, each cut into buckets of about `cap` bytes."""
        runs = []
        for t in tensors:
            if not runs or runs[-1][0] != self.owner[id(t)]:
                runs.append((self.owner[id(t)], []))
            runs[-1][1].append(t)
        return [Bucket(group, owner, len(group) if grads else 0)
                for owner, run in runs for group in common.split_buckets(run, cap, False)]

    def owned_params(self, rank):
        return [p for p in self.params if self.owner[id(p)] == rank]

    def zero_grad(self):
        for bucket in self.grad_buckets:
            bucket.flat.zero_()

    @torch.no_grad()
    def average(self, rank, trainers):
        """On an owner: the pushed sums of its buckets become means (buffers too: counters travel as floats)."""
        for bucket in self.push:
            if bucket.owner == rank:
                bucket.flat.div_(trainers)
                bucket.unpack_buffers()  # into the model's buffers; gradients are views already


class Partitions(Layout):
    """--comm pipelined: the parameters, in the order backward produces their gradients, cut into partitions of
    about `bucket_mb` (a partition under half of it takes the next tensor whatever its size, so a small tensor
    before a large one does not travel alone), each owned whole by one of `owners`, dealt out largest first to
    the least loaded in bytes (the shards within a percent of each other on ResNet-50 at 4 MiB, which sets the
    busiest link's bytes). A module's buffers go with its first parameter's partition (a module without
    parameters: with the module before it). push[i] holds partition i's gradients (views) then those buffers;
    pull[i] the same parameters' values then the same buffers: one message each way carries a partition."""

    def __init__(self, model, bucket_mb, owners):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buffers = list(model.buffers())
        self.scale = torch.ones((), device=self.params[0].device)  # fp16 is refused: always 1
        cap, parts, size = bucket_mb * 2 ** 20, [], 0
        for p in self.params[::-1]:
            if not parts or (size + 4 * p.numel() > cap and size >= cap / 2):
                parts.append([])
                size = 0
            parts[-1].append(p)
            size += 4 * p.numel()
        sizes = [sum(p.numel() for p in part) for part in parts]
        load, part_owner = {r: 0 for r in owners}, [None] * len(parts)
        for i in sorted(range(len(parts)), key=lambda i: (-sizes[i], i)):
            part_owner[i] = min(owners, key=lambda r: (load[r], r))
            load[part_owner[i]] += sizes[i]
        part_of = {id(p): i for i, part in enumerate(parts) for p in part}
        buffers, current = [[] for _ in parts], len(parts) - 1  # forward meets the last partition first
        for m in model.modules():
            first = next((p for p in m.parameters(recurse=False) if id(p) in part_of), None)
            current = part_of[id(first)] if first is not None else current
            buffers[current] += list(m.buffers(recurse=False))
        self.owner = {id(t): part_owner[i] for i, part in enumerate(parts) for t in (*part, *buffers[i])}
        self.owner[id(self.scale)] = SERVER
        self.grad_buckets = [Bucket([*part, *buffers[i]], part_owner[i], len(part)) for i, part in enumerate(parts)]
        self.pull = [Bucket([*part, *buffers[i]], part_owner[i], len(part)) for i, part in enumerate(parts)]
        self.buffer_buckets, self.push = [], self.grad_buckets
        self._grads_into_push_buckets()


def shard_owners(params, world_size):
    """--servers all: whole tensors, contiguous in backward's order, balanced by bytes over the ranks."""
    total, owners, done = sum(p.numel() for p in params), {}, 0
    for p in params[::-1]:
        owners[id(p)] = min(world_size - 1, int(world_size * (done + p.numel() / 2) / total))
        done += p.numel()
    return owners


# --------------------------------------------------------------------------- how it travels
class Transport:
    """How the state and the gradients travel. Synchronous transports: every rank calls pull() then push() each
    step, in the same order; pull() is skipped while the trainers already hold the owners' state (after the
    epoch's final pull); push() leaves the sums on the owners. A server that does not train serves with
    serve_step() and serve_epoch(); final_pull() (every rank) hands every trainer the owners' newest state, and
    end_epoch() (every trainer) does what the epoch's last step still owes them of it."""
    overlaps = False  # pushes and pulls overlap backward and forward: the yardstick measures a blocking twin
    updates_itself = False  # the owners' updates happen inside the exchange (pipelined), not in the step

    def __init__(self, layout, rank, trainers):
        self.layout, self.rank, self.trainers = layout, rank, list(trainers)
        self.trains = rank in self.trainers
        self.fresh, self.active, self.clock, self.lr = False, True, measure.NoClock(), None

    def blocking_twin(self):
        """The transport the yardstick's "blocking" kind exchanges the same buckets with, after backward."""
        return Collective(self.layout, self.rank, self.trainers)

    def flush(self):
        """Ends every exchange a step left in flight (pipelined); nothing to do for the others."""

    def end_epoch(self, scaler):
        self.final_pull(scaler)

    def peers(self, owner):
        return [t for t in self.trainers if t != owner]

    def pull(self):
        if not self.fresh:
            self.fresh = True
            self._pull()

    def finish_pull(self):
        """Waits for what the forward pass did not need (overlap)."""

    def push(self):
        self.fresh = False
        self._push()

    def final_pull(self, scaler):
        if self.trains:
            self.pull()
            self.finish_pull()
        else:
            serve(self, scaler)

    def serve_step(self, optimizer, scaler, lr, clock):
        server_step(self, optimizer, scaler, lr, clock)

    def serve_epoch(self, optimizer, scaler, lr_at, steps, warmup, clock, start=0, after_step=None):
        """The single server's epoch: steps `start` to `steps`, `after_step(done)` after each (the trainers'
        checkpoints), then the final pull as part of the last. Returns its figures, seconds per step after the
        first `warmup` of those steps."""
        lrs = [lr_at(step) for step in range(steps)]
        for step in range(start, steps):
            clock.begin()
            server_step(self, optimizer, scaler, lrs[step], clock)
            if after_step and step + 1 < steps:
                after_step(step + 1)
        serve(self, scaler)
        clock.mark("serve")
        sums, timed = clock.phase_sums(skip=warmup), steps - start - warmup
        return ServerStats(*(sums.get(k, 0.0) / timed for k in ("serve", "push_wait", "update")), lrs=lrs)

    def _start(self, bucket):
        """A push bucket's first contribution on this rank: its own gradients are there already (views); a
        server that does not train adds zeros; buffers are copied in."""
        if not self.trains:
            bucket.flat.zero_()
        else:
            bucket.pack_buffers()


class P2P(Transport):
    """The guide's original, tensor by tensor: the owner sends every tensor to every trainer, then receives every
    gradient (and buffer) from every trainer and sums them. With one server: a star through its link."""

    @torch.no_grad()
    def _pull(self):
        for bucket in self.layout.pull:
            for t in bucket.tensors:
                if self.rank == bucket.owner:
                    for peer in self.peers(bucket.owner):
                        dist.send(t, dst=peer)
                elif self.trains:
                    dist.recv(t, src=bucket.owner)

    @torch.no_grad()
    def _push(self):
        for bucket in self.layout.push:
            self._start(bucket)
            for slot in bucket.views:
                if self.rank == bucket.owner:  # the sum in the trainers' order, the owner's own at its place
                    own, got = slot.clone(), torch.empty_like(slot)
                    slot.zero_()
                    for trainer in self.trainers:
                        if trainer != self.rank:
                            dist.recv(got, src=trainer)
                        slot.add_(own if trainer == self.rank else got)
                elif self.trains:
                    dist.send(slot.contiguous(), dst=bucket.owner)


class Collective(Transport):
    """The guide's improvement: flat buckets, pull = broadcast from the owner, push = reduce(SUM) to it.
    Every bucket is in flight at once; then all are waited for."""

    @torch.no_grad()
    def _pull(self):
        works = [dist.broadcast(b.pack() if self.rank == b.owner else b.flat, src=b.owner, async_op=True)
                 for b in self.layout.pull]
        for work, bucket in zip(works, self.layout.pull):
            work.wait()
            if self.rank != bucket.owner:
                bucket.unpack()

    @torch.no_grad()
    def _push(self):
        for work in [self._reduce(b) for b in self.layout.push]:
            work.wait()

    def _reduce(self, bucket):
        self._start(bucket)
        return dist.reduce(bucket.flat, dst=bucket.owner, async_op=True)


class Overlap(Collective):
    """Collective, with the trainers' side overlapped: pushes start from gradient hooks during backward (in
    bucket order, so every rank issues the same collectives), and each module waits in a forward pre-hook only
    for the pull bucket holding its own tensors."""
    overlaps = True

    def __init__(self, layout, rank, trainers, model):
        super().__init__(layout, rank, trainers)
        self.pending, self.pushes, self.filled = {}, [], [0] * len(layout.grad_buckets)
        if not self.trains:
            return
        pull_of = {id(t): i for i, b in enumerate(layout.pull) for t in b.tensors}
        for m in model.modules():
            own = sorted({pull_of[id(t)] for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))})
            if own:
                m.register_forward_pre_hook(lambda module, inputs, own=own: self._wait_pull(own))
        self.push_of = {id(p): i for i, b in enumerate(layout.grad_buckets) for p in b.tensors}
        for p in layout.params:
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def _pull(self):
        if not self.trains:
            return super()._pull()
        self.pending = {i: dist.broadcast(b.pack() if self.rank == b.owner else b.flat, src=b.owner, async_op=True)
                        for i, b in enumerate(self.layout.pull)}

    def finish_pull(self):
        self._wait_pull(sorted(self.pending))

    @torch.no_grad()
    def _wait_pull(self, indices):
        for i in indices:
            if i in self.pending and self.active:
                self.clock.mark("compute")
                self.pending.pop(i).wait()
                if self.rank != self.layout.pull[i].owner:
                    self.layout.pull[i].unpack()
                self.clock.mark("pull")

    def _grad_ready(self, param):
        if not self.active:
            return
        self.filled[self.push_of[id(param)]] += 1
        grads = self.layout.grad_buckets
        while len(self.pushes) < len(grads) and self.filled[len(self.pushes)] == len(grads[len(self.pushes)].tensors):
            self.pushes.append(self._reduce(grads[len(self.pushes)]))

    @torch.no_grad()
    def _push(self):
        if not self.trains:
            return super()._push()
        # Buckets whose gradients never all arrived (unused parameters) go now, then the buffers.
        self.pushes += [self._reduce(b) for b in self.layout.push[len(self.pushes):]]
        for work in self.pushes:
            work.wait()
        self.pushes, self.filled = [], [0] * len(self.layout.grad_buckets)


class _Job:
    """One step's pipelined exchange on this rank: the partitions its backward has filled (and, on a GPU, the event
    after each); on an owner, each own partition's receives once posted and its update once made (True, or the
    event after it on a GPU); each partition's pull once posted (a trainer's receive, or None on its owner) with
    the event after its update; the partitions the training thread has taken in, whether every send has ended,
    the step's lr and the seconds its updates took."""

    def __init__(self, count, lr, ready=False):
        self.lr, self.ready, self.events, self.filled = lr, [ready] * count, [None] * count, [0] * count
        self.receives, self.updated, self.update_seconds = [None] * count, [None] * count, 0.0
        self.pulled, self.applied, self.finished = [None] * count, set(), False


def _record(device):
    """A CUDA event recorded now on the current stream (None on a CPU): another stream can wait for it."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


class Pipelined(Transport):
    """--comm pipelined (BytePS's push-sum-pull per partition, P3's order), on the Partitions layout. A partition is
    pushed (its gradients and its modules' buffers, one message) point-to-point to its owner as soon as backward has
    filled it; its owner sums the pushes in the trainers' order (p2p's exact sum), averages and updates that
    partition alone (torch's SGD step for its parameters: the same math as one optimizer.step()) and sends it back
    to every trainer, as soon as every push to it has arrived; each module of the next forward waits, in a
    pre-hook, only for the partitions holding its own tensors. A "comm" step returns with its exchange in flight:
    the next forward, flush() or end_epoch() ends it; the yardstick's "blocking" kind runs the same exchange
    whole after backward.

    Bytes: a trainer sends every partition it does not own once and receives it back once; an owner receives its
    own from each other trainer and sends it back to each. With N trainers that all own a balanced share, that is
    2(N-1)/N x state through every link, each way at once, the all-reduce's bytes (gloo's reduce is not this
    pattern and moved 28% more); with one server, a star of the same messages.

    The order: every rank issues its sends and receives in one sequence fixed by the layout alone: the pushes in
    partition order (the order backward fills them), then the pulls in reverse (the order the next forward needs
    them), each owner's sends to its peers in rank order. A pair of ranks therefore issues its matching sends and
    receives in the same order (NCCL matches them by order and has no any-source receive), and every operation
    comes after every earlier one in the sequence on both sides, so none can wait for one that comes after it.
    Rank-local timing (which partition a rank's backward filled first) only delays when a rank issues its part,
    never the order: there is nothing to agree on while running. A communication thread issues them, on a process
    group of its own (the training thread's collectives never interleave with them), waiting where the sequence
    needs its own backward (before a push) or the update of a partition it owns (before that pull). An owner's
    updater thread sums, updates and packs each of its partitions as soon as its pushes are in (during backward,
    for all but the last few), so the pulls find them ready. On a GPU both threads issue on one stream of their
    own, ordered against the training stream by events only, never a host sync. A server that does not train
    (one server) runs the same sequence in serve_step, with its updater beside it.
    """
    overlaps, updates_itself = True, True

    def __init__(self, layout, rank, trainers, model, optimizer=None):
        super().__init__(layout, rank, trainers)
        self.optimizer, self.device = optimizer, layout.params[0].device
        self.group = dist.new_group()  # every rank must call new_group
        self.count = len(layout.push)
        self.inbox = {p: [torch.empty_like(b.flat) for _ in self.peers(rank)]
                      for p, b in enumerate(layout.push) if b.owner == rank}  # the others' pushes to my partitions
        self.pending = self.job = None  # the exchange the next forward takes in; the one this step started
        self.changed, self.jobs, self.updates, self.error = threading.Condition(), queue.Queue(), queue.Queue(), None
        self.owned = [p for p, b in enumerate(layout.push) if b.owner == rank]
        # The threads' one CUDA stream: an update, then the pull of what it updated, in the order they are issued.
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if self.owned:
            threading.Thread(target=self._run, args=(self.updates, self._update_owned), daemon=True).start()
        if not self.trains:
            return
        part_of = {id(t): i for i, b in enumerate(layout.pull) for t in b.tensors}
        for m in model.modules():
            needs = sorted({part_of[id(t)] for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))
                            if id(t) in part_of}, reverse=True)
            if needs:
                m.register_forward_pre_hook(lambda module, inputs, needs=needs: self._before_forward(needs))
        self.push_of = {id(p): i for i, b in enumerate(layout.push) for p in b.tensors[:b.grads]}
        for p in layout.params:
            p.register_post_accumulate_grad_hook(self._grad_ready)
        threading.Thread(target=self._run, args=(self.jobs, self._exchange), daemon=True).start()

    def blocking_twin(self):
        return self  # inactive, push() runs the whole exchange after backward

    # the training thread
    def pull(self):
        if self.active:  # the exchange the last step left in flight is taken in by this forward, module by module
            if self.pending is not None:
                self.flush()
            self.pending, self.job = self.job, _Job(self.count, self.lr)
            self.jobs.put(self.job)

    def _before_forward(self, needs):
        if self.active and self.pending is not None:
            self._apply(self.pending, needs)

    def finish_pull(self):
        if self.pending is not None:  # partitions no module asked for (parameters unused in forward)
            self._apply(self.pending, range(self.count))
            self.pending = None

    def _grad_ready(self, param):  # autograd's thread
        if not self.active:
            return
        job, p = self.job, self.push_of[id(param)]
        job.filled[p] += 1
        if job.filled[p] == self.layout.push[p].grads:
            self._ready(job, [p])

    def _ready(self, job, parts):
        events = {p: _record(self.device) for p in parts}  # the communication stream waits for the gradients
        with self.changed:
            for p in parts:
                job.events[p], job.ready[p] = events[p], True
            self.changed.notify_all()

    def push(self):
        if self.active:  # partitions whose gradients never all arrived (unused parameters: zeros) go too
            self._ready(self.job, [p for p in range(self.count) if not self.job.ready[p]])
            return
        self.flush()
        job = _Job(self.count, self.lr)
        self._ready(job, range(self.count))
        self.jobs.put(job)
        self._end(job)

    def flush(self):
        for job in (self.pending, self.job):
            if job is not None:
                self._end(job)
        self.pending = self.job = None

    def end_epoch(self, scaler):
        self.flush()

    def _end(self, job):
        """Takes in every partition of `job` and waits until its last send has ended (nothing of it in flight)."""
        self._apply(job, range(self.count))
        self._wait(lambda: job.finished)

    def _wait(self, condition):
        with self.changed:
            self.changed.wait_for(lambda: condition() or self.error is not None)
        if self.error is not None:
            raise self.error

    def _apply(self, job, parts):
        """Waits for the pulls of `parts` (once each) and takes them into the model."""
        parts = [p for p in parts if p not in job.applied]
        if not parts:
            return
        self.clock.mark("compute")
        for p in parts:
            self._wait(lambda: job.pulled[p] is not None)
            work, event = job.pulled[p]
            if work is not None:  # a trainer: the owner's partition arrives
                work.wait()
                self.layout.pull[p].unpack()
            elif event is not None:  # the owner: its own update, made on the communication stream
                torch.cuda.current_stream().wait_event(event)
            job.applied.add(p)
        self.clock.mark("pull")

    def final_pull(self, scaler):
        """Every rank, nothing in flight after it: each owner sends its partitions to every trainer."""
        self.flush()
        sends, receives = [], []
        for p in reversed(range(self.count)):
            bucket = self.layout.pull[p]
            if bucket.owner == self.rank:
                bucket.pack()
                sends += [dist.isend(bucket.flat, peer, group=self.group, tag=self.count + p)
                          for peer in self.peers(self.rank)]
            elif self.trains:
                receives.append((dist.irecv(bucket.flat, bucket.owner, group=self.group, tag=self.count + p), bucket))
        for work in sends:
            work.wait()
        for work, bucket in receives:
            work.wait()
            bucket.unpack()

    # the communication thread (on a server that does not train: serve_step) and the owner's updater
    def _run(self, jobs, work):
        with common.comm_stream(self.device, self.stream):
            while True:
                job = jobs.get()
                try:
                    work(job)
                except BaseException as e:  # noqa: BLE001 - raised again by the training thread's wait
                    with self.changed:
                        self.error = e
                        self.changed.notify_all()
                    return

    @torch.no_grad()
    def _exchange(self, job, clock=None):
        """This rank's part of the sequence (see the class): the step's pushes, then its pulls. The updates of its
        own partitions run beside it, in the updater, as soon as their pushes are in."""
        clock = clock or measure.NoClock()
        sends, peers = [], self.peers(self.rank)
        if self.owned:
            self.updates.put(job)
        for p, bucket in enumerate(self.layout.push):
            if bucket.owner == self.rank:
                receives = [dist.irecv(box, peer, group=self.group, tag=p) for box, peer in zip(self.inbox[p], peers)]
                with self.changed:
                    job.receives[p] = receives
                    self.changed.notify_all()
            elif self.trains:
                self._ready_here(job, p)
                sends.append(dist.isend(bucket.flat, bucket.owner, group=self.group, tag=p))
        clock.mark("push")
        for p in reversed(range(self.count)):
            bucket, work, event = self.layout.pull[p], None, None
            if bucket.owner == self.rank:
                self._wait(lambda: job.updated[p] is not None)
                event = None if job.updated[p] is True else job.updated[p]
                clock.mark("push_wait")
                sends += [dist.isend(bucket.flat, peer, group=self.group, tag=self.count + p) for peer in peers]
                clock.mark("serve")
            elif self.trains:
                work = dist.irecv(bucket.flat, bucket.owner, group=self.group, tag=self.count + p)
            with self.changed:
                job.pulled[p] = work, event
                self.changed.notify_all()
        for work in sends:
            work.wait()
        clock.mark("serve")
        with self.changed:
            job.finished = True
            self.changed.notify_all()

    @torch.no_grad()
    def _update_owned(self, job):
        """The updater: each partition this rank owns, in the order its pushes arrive, summed, averaged, updated
        and packed for its pull, so that the pull phase finds them ready (only the last one waits)."""
        for p in self.owned:
            self._wait(lambda: job.receives[p] is not None)
            if self.trains:
                self._ready_here(job, p)
            for received in job.receives[p]:
                received.wait()
            start = time.perf_counter()
            self._update(job, p)
            self.layout.pull[p].pack()
            job.update_seconds += time.perf_counter() - start
            event = _record(self.device)  # the owner's next forward, and this partition's pull, wait for it
            with self.changed:
                job.updated[p] = True if event is None else event
                self.changed.notify_all()

    def _ready_here(self, job, p):
        """Waits until this rank's backward has filled partition p, then packs its buffers behind the gradients."""
        self._wait(lambda: job.ready[p])
        if job.events[p] is not None:
            torch.cuda.current_stream().wait_event(job.events[p])
        self.layout.push[p].pack_buffers()

    def _update(self, job, p):
        """The owner: the sum of the pushes in the trainers' order (its own at its place: the sum p2p and the
        reference make, exactly), the mean, the update of that partition's parameters alone."""
        bucket, boxes = self.layout.push[p], iter(self.inbox[p])
        terms = [bucket.flat if trainer == self.rank else next(boxes) for trainer in self.trainers]
        total = terms[0]  # the first trainer's own buffer, or the received one (scratch until the next step)
        for term in terms[1:]:
            total.add_(term)
        if total is not bucket.flat:
            bucket.flat.copy_(total)
        bucket.flat.div_(len(self.trainers))
        bucket.unpack_buffers()
        sgd_step(self.optimizer, bucket.tensors[:bucket.grads], job.lr)

    # a server that does not train
    def serve_step(self, optimizer, scaler, lr, clock):
        job = _Job(self.count, lr)
        self._exchange(job, clock)
        return job

    def serve_epoch(self, optimizer, scaler, lr_at, steps, warmup, clock, start=0, after_step=None):
        """The single server's epoch: one exchange per step, each ending with the trainers' pulls (the epoch's
        final pull is its last step's). Its update time is the updater's, its wait the rest until a pull."""
        lrs, updates = [lr_at(step) for step in range(steps)], []
        for step in range(start, steps):
            clock.begin()
            updates.append(self.serve_step(optimizer, scaler, lrs[step], clock).update_seconds)
            if after_step and step + 1 < steps:
                after_step(step + 1)
        sums, timed = clock.phase_sums(skip=warmup), steps - start - warmup
        update = sum(updates[warmup:]) / timed
        return ServerStats(sums.get("serve", 0.0) / timed, sums.get("push_wait", 0.0) / timed - update, update,
                           lrs=lrs)




def make_layout(comm, model, bucket_mb, world_size, sharded):
    """The layout of `comm`: pipelined's partitions, or the buckets of the others; sharded over every rank."""
    if comm == "pipelined":
        return Partitions(model, bucket_mb, list(range(world_size)) if sharded else [SERVER])
    params = [p for p in model.parameters() if p.requires_grad]
    return Layout(model, bucket_mb, shard_owners(params, world_size) if sharded else None)


def make_transport(comm, layout, model, rank, trainers, optimizer=None):
    if comm == "pipelined":
        return Pipelined(layout, rank, trainers, model, optimizer)
    if comm == "overlap":
        return Overlap(layout, rank, trainers, model)
    return {"p2p": P2P, "collective": Collective}[comm](layout, rank, trainers)


# --------------------------------------------------------------------------- the asynchronous server
PULL, PUSH = 0, 1


class Async(Transport):
    """--mode async: each worker asks for the newest state (a PULL ticket) before computing and sends its
    gradients (a PUSH ticket, with the version it computed on) after; the server applies every push at once, in
    the order the tickets arrive, and is full duplex: a reader thread takes the tickets (any-source, on a gloo
    group: NCCL has none), a sender thread answers the pulls while the server's own thread receives and applies
    the pushes, each direction on a process group of its own (the state out on `pulls`, the gradients in on
    `pushes`, the small replies on gloo groups of their own), so one worker's pull never waits behind another's
    push through the server's link. The rules that keep it exact:
      - every push is received and applied once, one at a time, in ticket order, by the server's thread;
      - a pull is a snapshot of the state and its version taken under the same lock as the updates (never half
        updated), that includes every push the server had wholly received when the pull's ticket arrived (it
        waits for their update, not for a transfer), and a worker's push returns only once the server has it
        (a one-element receipt), so a pull that comes after a push ended sees it: serialized workers are never
        stale, and staleness (updates between a worker's pull and its push) counts as before.
    The epoch's final pull is a collective one."""

    def __init__(self, layout, rank, num_workers):
        super().__init__(layout, rank, range(1, num_workers + 1))
        self.num_workers = num_workers
        self.tickets, self.replies, self.receipts = (dist.new_group(backend="gloo") for _ in range(3))
        self.pulls, self.pushes = dist.new_group(), dist.new_group()  # every rank must call new_group
        self.final = Collective(layout, rank, self.trainers)
        self.version = 0
        self.latest = {}  # server: each worker's latest buffers, whose mean it serves
        self.changed = threading.Condition()  # server: guards the state, the version and the counts below
        self.received = self.applied = 0
        self.device = layout.params[0].device
        self.updated = self.packed = None  # server, on a GPU: the last update's and the last snapshot's events

    def state_dict(self):
        return {"version": self.version, "latest": {str(w): b for w, b in self.latest.items()}}

    def load_state_dict(self, state):
        self.version, self.latest = state["version"], {int(w): b for w, b in state["latest"].items()}

    def _ticket(self, kind):
        dist.send(torch.tensor([kind, self.version]), dst=SERVER, group=self.tickets)

    @torch.no_grad()
    def pull(self):  # worker
        self._ticket(PULL)
        version = torch.zeros(1, dtype=torch.int64)
        dist.recv(version, src=SERVER, group=self.replies)
        self.version = int(version)
        for bucket in self.layout.pull:
            dist.recv(bucket.flat, src=SERVER, group=self.pulls)
            bucket.unpack()

    @torch.no_grad()
    def push(self):  # worker
        self._ticket(PUSH)
        for bucket in self.layout.push:
            bucket.pack_buffers()
            dist.send(bucket.flat, dst=SERVER, group=self.pushes)
        dist.recv(torch.zeros(1), src=SERVER, group=self.receipts)  # the server has it all

    def final_pull(self, scaler):
        self.final.fresh = False
        self.final.final_pull(scaler)

    def serve_step(self, optimizer, scaler, lr, clock):
        self.serve(self.num_workers, optimizer, lambda i: lr, clock)

    def serve_epoch(self, optimizer, scaler, lr_at, steps, warmup, clock, start=0, after_step=None):
        """A step's worth of gradients (one per worker) between checkpoints, so that a checkpoint after step k
        finds every worker's k-th gradient applied: each worker stops there, after its k-th push, and the server
        writes its part once it has applied k x workers of them."""
        w = self.num_workers

        def at(applied):
            if after_step and applied % w == 0 and start + applied // w < steps:
                after_step(start + applied // w)

        clock.begin()
        stale = self.serve(w * (steps - start), optimizer, lambda i: lr_at((start * w + i) / w), clock, at)
        self.final_pull(scaler)  # the epoch's model, to everyone
        sums, served = clock.phase_sums(), steps - start
        return ServerStats(self.sent_seconds / served, sums.get("wait", 0.0) / served,
                           (sums.get("update", 0.0) + sums.get("receive", 0.0)) / served,
                           sum(stale) / len(stale), max(stale), [lr_at(s) for s in range(steps)])

    @torch.no_grad()
    def serve(self, pushes, optimizer, lr_of, clock, after_push=None):
        """Server: answers tickets until `pushes` gradients have been applied (`after_push(n)` after the n-th, in
        this thread); returns their staleness. The tickets after the last push are left to the next call."""
        inbox, outbox, staleness = queue.Queue(), queue.Queue(), []
        self.sent_seconds = 0.0
        threads = [threading.Thread(target=self._read_tickets, args=(pushes, inbox, outbox), daemon=True),
                   threading.Thread(target=self._send_pulls, args=(outbox, inbox), daemon=True)]
        for thread in threads:
            thread.start()
        while len(staleness) < pushes:
            item = inbox.get()
            if isinstance(item, BaseException):
                raise item
            worker, version = item
            clock.mark("wait")
            for bucket in self.layout.push:
                dist.recv(bucket.flat, src=worker, group=self.pushes)
            with self.changed:
                self.received += 1
            dist.send(torch.zeros(1), dst=worker, group=self.receipts)
            clock.mark("receive")
            with self.changed:
                if self.packed is not None:
                    torch.cuda.current_stream().wait_event(self.packed)
                staleness.append(self.version - version)
                self.latest[worker] = [b.flat.clone() for b in self.layout.buffer_buckets]
                for i, bucket in enumerate(self.layout.buffer_buckets):
                    bucket.flat.copy_(sum(latest[i] for latest in self.latest.values()) / len(self.latest))
                    bucket.unpack()
                common.set_lr(optimizer, lr_of(len(staleness) - 1) / self.num_workers)
                optimizer.step()  # the gradients are views of what was just received
                self.version += 1
                self.applied += 1
                self.updated = _record(self.device)
                self.changed.notify_all()
            clock.mark("update")
            if after_push:
                after_push(len(staleness))
        for thread in threads:
            thread.join()
        return staleness

    def _read_tickets(self, pushes, inbox, outbox):
        """The server's reader: pushes to the server's thread in arrival order; pulls to the sender, each with
        the number of pushes received by then (its snapshot includes them)."""
        ticket, seen = torch.zeros(2, dtype=torch.int64), 0
        try:
            while seen < pushes:
                worker = dist.recv(ticket, group=self.tickets)
                if int(ticket[0]) == PULL:
                    with self.changed:
                        outbox.put((worker, self.received))
                else:
                    inbox.put((worker, int(ticket[1])))
                    seen += 1
            outbox.put(None)
        except BaseException as e:  # noqa: BLE001 - raised again by the server's thread
            inbox.put(e)
            outbox.put(None)

    @torch.no_grad()
    def _send_pulls(self, outbox, inbox):
        """The server's sender: a snapshot of the state for each pull, sent while pushes keep arriving."""
        try:
            with common.comm_stream(self.device):
                while (item := outbox.get()) is not None:
                    worker, needed = item
                    start = time.perf_counter()
                    with self.changed:
                        self.changed.wait_for(lambda: self.applied >= needed)
                        if self.updated is not None:
                            torch.cuda.current_stream().wait_event(self.updated)
                        version = self.version
                        for bucket in self.layout.pull:
                            bucket.pack()
                        self.packed = _record(self.device)  # the next update waits until this copy is taken
                    dist.send(torch.tensor([version]), dst=worker, group=self.replies)
                    for bucket in self.layout.pull:
                        dist.send(bucket.flat, dst=worker, group=self.pulls)
                    self.sent_seconds += time.perf_counter() - start
        except BaseException as e:  # noqa: BLE001 - raised again by the server's thread
            inbox.put(e)


# --------------------------------------------------------------------------- the server's figures, to the trainers
@dataclasses.dataclass
class ServerStats:
    """The single server's epoch, per step: serving the pull, waiting for the pushes (the workers' compute
    included), averaging and updating; async: staleness; and the learning rate it applied at each step."""
    serve: float = 0.0
    push_wait: float = 0.0
    update: float = 0.0
    staleness_mean: float = 0.0
    staleness_max: float = 0.0
    lrs: list = dataclasses.field(default_factory=list)

    SCALARS = ("serve", "push_wait", "update", "staleness_mean", "staleness_max")

    def share(self, ctx, steps):
        """Every rank calls it (the trainers with zeros): the server's figures, on every rank."""
        packed = torch.tensor([*(getattr(self, k) for k in self.SCALARS), *(self.lrs or [0.0] * steps)],
                              dtype=torch.float64, device=ctx.device)
        values = measure.all_reduce(packed).tolist()
        return ServerStats(*values[:len(self.SCALARS)], lrs=values[len(self.SCALARS):])


# --------------------------------------------------------------------------- the two roles
def messages_per_step(comm, layout, args):
    """Messages per training step: per tensor and peer (p2p), per partition and peer (pipelined), per bucket
    (collective: one call each), per worker two tickets, a version, a receipt and every bucket each way (async)."""
    if args.mode == "async":
        return comm.num_workers * (4 + len(layout.pull) + len(layout.push))
    if args.comm in ("p2p", "pipelined"):
        return sum(len(comm.peers(b.owner)) * (len(b.tensors) if args.comm == "p2p" else 1)
                   for b in layout.pull + layout.push)
    return len(layout.pull) + len(layout.push)


def server_role(args, ctx, comm, optimizer, scaler, method):
    """The single server: it serves the trainers' steps, in the yardstick too, and has epochs of its own."""
    def step(images, targets, clock, lr, kind="comm"):
        if kind != "local":  # the workers' no-communication step needs no server
            comm.serve_step(optimizer, scaler, lr, clock)

    def serve_epoch(epoch, steps, start, after_step):
        cold = not serve_epoch.ran  # the process's first epoch (epoch 1, or the first after a restart)
        serve_epoch.ran = True
        stats = comm.serve_epoch(optimizer, scaler, lambda s: common.lr_at(args, epoch - 1 + s / steps), steps,
                                 min(args.warmup_steps, steps - start - 1) if cold else 0,
                                 measure.StepClock(ctx.device), start, after_step)
        common.log(ctx, f"server epoch {epoch}: per step: serve {1e3 * stats.serve:.1f}ms, wait "
                        f"{1e3 * stats.push_wait:.1f}ms, aggregate+update {1e3 * stats.update:.1f}ms"
                        + (f", staleness {stats.staleness_mean:.2f} (max {stats.staleness_max:.0f})"
                           if args.mode == "async" else ""))
        return stats

    serve_epoch.ran = False
    method.step, method.serve_epoch = step, serve_epoch
    method.before_epochs = lambda: comm.final_pull(scaler)  # the initial state, before any clock


def trainer_role(args, ctx, model, comm, optimizer, scaler, method, sharded):
    """A worker (or, sharded, a worker that also owns a shard): it trains, and reports the server's figures."""
    method.step = make_worker_step(model, comm, args, ctx, optimizer if sharded else None, scaler)
    method.before_epochs = lambda: comm.final_pull(scaler)

    def end_of_epoch(clock):  # the epoch's last update, so every trainer validates the same model
        comm.end_epoch(scaler)
        clock.mark("pull")

    def figures(record, server):
        phases = record["phase_times"]
        out = dict(avg_comm_time_pull=phases["pull"], avg_comm_time_push=phases["push"],
                   avg_comm_time=phases["pull"] + phases["push"])
        if server is not None:
            out.update(avg_server_serve_time=server.serve, avg_server_push_wait_time=server.push_wait,
                       avg_server_update_time=server.update, lrs=server.lrs)
        if args.mode == "async":
            out.update(staleness_mean=server.staleness_mean, staleness_max=server.staleness_max,
                       updates_per_second=record["steps"] * len(comm.trainers) / record["train_time"])
        return out

    method.end_of_epoch, method.figures = end_of_epoch, figures


def trainers_of(args, world_size):
    """The ranks that train: every rank with --servers all, else all but the server."""
    return list(range(world_size)) if args.servers == "all" else [r for r in range(world_size) if r != SERVER]


def make_method(args, ctx, info, model, weights=None):
    """The layout, the transport, this rank's role (server or trainer) and its state, as the driver runs them."""
    sharded, trainers = args.servers == "all", trainers_of(args, ctx.world_size)
    workers = None if sharded else dist.new_group(ranks=trainers)  # every rank must call new_group
    layout = make_layout(args.comm, model, args.bucket_mb, ctx.world_size, sharded)
    owned = layout.owned_params(ctx.rank)
    optimizer = common.make_optimizer(args, owned) if owned else None
    scaler = common.make_scaler(args, ctx)
    comm = Async(layout, ctx.rank, len(trainers)) if args.mode == "async" else \
        make_transport(args.comm, layout, model, ctx.rank, trainers, optimizer)
    state_bytes = sum(4 * t.numel() for t in layout.params + layout.buffers)
    how = (f" ({len(layout.push)} partitions of <= {args.bucket_mb:g} MiB, each pushed to its owner as backward "
           "fills it, updated once all its pushes are in, pulled in the order the next forward needs it)"
           if args.comm == "pipelined" else "")
    method = driver.Method(
        kind="ps", description=f"{'every rank serves a shard' if sharded else 'rank 0 serves'}, --comm {args.comm}"
                               f"{how}, --mode {args.mode}, {state_bytes / 1e6:.1f} MB of state",
        settings=dict(comm=args.comm, servers=args.servers, mode=args.mode, bucket_mb=args.bucket_mb),
        model=model, step=None, trainers=trainers, group=workers, replicated=False, overlaps=comm.overlaps,
        run_length=2,  # a pull waits for the server's update of the step before: runs of 2 in the yardstick
        flush=comm.flush,  # pipelined: a step leaves its exchange in flight (the others: nothing to do)
        state={"model": model, "optimizer": optimizer, "scaler": scaler,
               **({"async": comm} if args.mode == "async" else {})} if owned else {},
        share=None if sharded else (lambda stats: (stats or ServerStats()).share(ctx, info.steps)),
        fields=dict(weights=weights, num_workers=len(trainers), state_bytes=state_bytes,
                    largest_shard_bytes=max(sum(4 * p.numel() for p in layout.owned_params(r))
                                            for r in range(ctx.world_size)),
                    gradient_bytes=sum(4 * p.numel() for p in layout.params),
                    messages_per_step=messages_per_step(comm, layout, args)))
    if ctx.rank in trainers:
        trainer_role(args, ctx, model, comm, optimizer, scaler, method, sharded)
    else:
        server_role(args, ctx, comm, optimizer, scaler, method)
    return method


def main(argv=None):
    args = parse_args(argv)
    with driver.session(args) as ctx:
        if ctx.world_size < 2 and args.servers != "all":
            raise common.UserError("the parameter server needs at least 2 processes, a server and a worker "
                                   "(run with torchrun --nproc_per_node=2 or more)")
        # The trainers shard the training set among themselves.
        ds = data.open_data(args, ctx, len(trainers_of(args, ctx.world_size)))
        model, weights = common.build_model(args, ctx, ds.info.num_classes)
        driver.train(args, ctx, ds, make_method(args, ctx, ds.info, model, weights))


if __name__ == "__main__":
    common.run_main(main)
