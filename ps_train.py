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
--servers all shards the server: every rank trains AND owns a slice of the parameters (whole tensors, contiguous
in the order backward produces them, balanced by bytes, so pushes can start early), with its optimizer state;
each bucket travels between its owner and the others, so every link carries ~2(N-1)/N of the model per step
instead of 2(N-1) models through one server's link. --mode async: one server applies each worker's gradient as
it arrives (with lr / workers, so a round of updates moves as far as one synchronous step) and every worker pulls
the newest parameters; staleness = server updates between a worker's pull and its push.
BatchNorm: workers push their running statistics with their gradients; the owner keeps the mean (async: of each
worker's latest) and serves it with the parameters, so every worker holds, and validates, the same model; the
server validates its share of the val set too. fp16 (one server, sync): the server owns the GradScaler and
serves its scale with the parameters; workers push scaled gradients; the server averages, unscales once, skips
the step on inf/NaN for everyone and adjusts the scale.
Writes results_ps.json (--comm collective) or results_ps_<comm>[_sharded][_async].json unless --output is given.
"""
import dataclasses

import torch
import torch.distributed as dist
import torch.nn as nn

import common
import data
import driver
import measure
from modes import DEFAULT_BUCKET_MB, PS_COMMS, PS_MODES, PS_SERVERS, variant_output

SERVER = 0
COMMS = PS_COMMS  # the first is the default


def output_name(args):
    suffix = ("_sharded" if args.servers == "all" else "") + ("_async" if args.mode == "async" else "")
    return variant_output("ps", args.comm, COMMS[0]).replace(".json", suffix + ".json")


def parse_args(argv=None):
    p = common.make_parser(__doc__, output_name)
    p.add_argument("--comm", choices=COMMS, default=COMMS[0], help="how parameters and gradients travel")
    p.add_argument("--bucket-mb", type=common.positive(float), default=DEFAULT_BUCKET_MB,
                   help="flat-buffer size in MiB for --comm collective and overlap")
    p.add_argument("--servers", choices=PS_SERVERS, default=PS_SERVERS[0],
                   help="1: rank 0 serves, the others train; all: every rank trains and serves a shard")
    p.add_argument("--mode", choices=PS_MODES, default=PS_MODES[0],
                   help="async: the server applies each gradient as it arrives (one server, its own exchange)")
    args = common.parse(p, argv)
    if args.comm == "p2p" and args.channels_last:
        p.error("--comm p2p sends each tensor as it is and needs contiguous tensors (drop --channels-last "
                "or use --comm collective)")
    if args.mode == "async" and (args.servers != "1" or args.comm != COMMS[0]):
        p.error("--mode async has one server and its own exchange, one packed message each way per step "
                "(drop --servers and --comm)")
    if args.amp and args.amp_dtype == "fp16" and (args.mode == "async" or args.servers == "all"):
        p.error("fp16 loss scaling needs the single synchronous server (use --amp-dtype bf16)")
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
    while the servers wait); "blocking": overlap's buckets exchanged blocking (the collective transport)."""
    criterion = nn.CrossEntropyLoss()
    blocking = Collective(comm.layout, comm.rank, comm.trainers) if comm.overlaps else None
    local = {}

    def train_step(images, targets, clock, lr=None, kind="comm"):
        comm.active = kind == "comm"  # the overlap transport's hooks stay quiet in the other kinds
        try:
            return local_step(images, targets) if kind == "local" else \
                exchange_step(images, targets, clock, lr, blocking if kind == "blocking" else comm)
        finally:
            comm.active = True

    def exchange_step(images, targets, clock, lr, via):
        via.clock = clock
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
        via.push()
        clock.mark("push")
        if optimizer is not None:
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
    """A float32 flat buffer that one rank owns: the server's, or with sharding the rank owning its tensors."""

    def __init__(self, tensors, owner):
        super().__init__(tensors, torch.float32)
        self.owner = owner


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
        self.grad_buckets = self._buckets(self.params[::-1], cap)
        self.buffer_buckets = self._buckets(self.buffers, cap)
        self.push = self.grad_buckets + self.buffer_buckets
        for bucket in self.grad_buckets:
            for p, view in zip(bucket.tensors, bucket.views):
                p.grad = view

    def _buckets(self, tensors, cap):
        """Runs of one owner, each cut into buckets of about `cap` bytes."""
        runs = []
        for t in tensors:
            if not runs or runs[-1][0] != self.owner[id(t)]:
                runs.append((self.owner[id(t)], []))
            runs[-1][1].append(t)
        return [Bucket(group, owner) for owner, run in runs for group in common.split_buckets(run, cap, False)]

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
                if bucket in self.buffer_buckets:
                    bucket.unpack()  # into the model's buffers; gradients are views already


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
    serve_step() and serve_epoch(); final_pull() (every rank) hands every trainer the owners' newest state."""
    overlaps = False  # pushes and pulls overlap backward and forward: the yardstick measures a blocking twin

    def __init__(self, layout, rank, trainers):
        self.layout, self.rank, self.trainers = layout, rank, list(trainers)
        self.trains = rank in self.trainers
        self.fresh, self.active, self.clock = False, True, measure.NoClock()

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
        elif bucket in self.layout.buffer_buckets:
            bucket.pack()


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


def make_transport(comm, layout, model, rank, trainers):
    if comm == "overlap":
        return Overlap(layout, rank, trainers, model)
    return {"p2p": P2P, "collective": Collective}[comm](layout, rank, trainers)


# --------------------------------------------------------------------------- the asynchronous server
PULL, PUSH = 0, 1


class Async(Transport):
    """--mode async: each worker asks for the newest state (a PULL ticket) before computing and sends its
    gradients (a PUSH ticket, with the version it computed on) after; the server answers tickets in the order
    they arrive, applying every push at once. Tickets travel on a gloo group (any-source receive), the state
    and gradients on the main one; the epoch's final pull is a collective one."""

    def __init__(self, layout, rank, num_workers):
        super().__init__(layout, rank, range(1, num_workers + 1))
        self.num_workers = num_workers
        self.tickets = dist.new_group(backend="gloo")  # every rank must call new_group
        self.final = Collective(layout, rank, self.trainers)
        self.version = 0
        self.latest = {}  # server: each worker's latest buffers, whose mean it serves

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
        dist.recv(version, src=SERVER, group=self.tickets)
        self.version = int(version)
        for bucket in self.layout.pull:
            dist.recv(bucket.flat, src=SERVER)
            bucket.unpack()

    @torch.no_grad()
    def push(self):  # worker
        self._ticket(PUSH)
        for bucket in self.layout.push:
            if bucket in self.layout.buffer_buckets:
                bucket.pack()
            dist.send(bucket.flat, dst=SERVER)

    def final_pull(self, scaler):
        self.final.fresh = False
        self.final.final_pull(scaler)

    def serve_step(self, optimizer, scaler, lr, clock):
        self.serve(self.num_workers, optimizer, lambda i: lr, clock)

    def serve_epoch(self, optimizer, scaler, lr_at, steps, warmup, clock, start=0, after_step=None):
        """A step's worth of gradients (one per worker) at a time, so that a checkpoint after step k finds every
        worker's k-th gradient applied: each worker stops there, after its k-th push."""
        clock.begin()
        stale = []
        for step in range(start, steps):
            first = step * self.num_workers
            stale += self.serve(self.num_workers, optimizer, lambda i: lr_at((first + i) / self.num_workers), clock)
            if after_step and step + 1 < steps:
                after_step(step + 1)
        self.final_pull(scaler)  # the epoch's model, to everyone
        sums, served = clock.phase_sums(), steps - start
        return ServerStats(sums.get("serve", 0.0) / served, sums.get("wait", 0.0) / served,
                           (sums.get("update", 0.0) + sums.get("receive", 0.0)) / served,
                           sum(stale) / len(stale), max(stale), [lr_at(s) for s in range(steps)])

    @torch.no_grad()
    def serve(self, pushes, optimizer, lr_of, clock):
        """Server: answers tickets until `pushes` gradients have been applied; returns their staleness."""
        ticket, staleness = torch.zeros(2, dtype=torch.int64), []
        while len(staleness) < pushes:
            worker = dist.recv(ticket, group=self.tickets)
            clock.mark("wait")
            if int(ticket[0]) == PULL:
                dist.send(torch.tensor([self.version]), dst=worker, group=self.tickets)
                for bucket in self.layout.pull:
                    dist.send(bucket.pack(), dst=worker)
                clock.mark("serve")
                continue
            for bucket in self.layout.push:
                dist.recv(bucket.flat, src=worker)
            clock.mark("receive")
            staleness.append(self.version - int(ticket[1]))
            self.latest[worker] = [b.flat.clone() for b in self.layout.buffer_buckets]
            for i, bucket in enumerate(self.layout.buffer_buckets):
                bucket.flat.copy_(sum(latest[i] for latest in self.latest.values()) / len(self.latest))
                bucket.unpack()
            common.set_lr(optimizer, lr_of(len(staleness) - 1) / self.num_workers)
            optimizer.step()  # the gradients are views of what was just received
            self.version += 1
            clock.mark("update")
        return staleness


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
    """Messages per training step: per tensor and peer (p2p), per bucket (collective: one call each), per
    worker two tickets and every bucket each way (async)."""
    if args.mode == "async":
        return comm.num_workers * (2 + len(layout.pull) + len(layout.push))
    if args.comm == "p2p":
        return sum(len(comm.peers(b.owner)) * len(b.tensors) for b in layout.pull + layout.push)
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
        comm.final_pull(scaler)
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
    params = [p for p in model.parameters() if p.requires_grad]
    layout = Layout(model, args.bucket_mb, shard_owners(params, ctx.world_size) if sharded else None)
    comm = Async(layout, ctx.rank, len(trainers)) if args.mode == "async" else \
        make_transport(args.comm, layout, model, ctx.rank, trainers)
    owned = layout.owned_params(ctx.rank)
    optimizer = common.make_optimizer(args, owned) if owned else None
    scaler = common.make_scaler(args, ctx)
    state_bytes = sum(4 * t.numel() for t in layout.params + layout.buffers)
    method = driver.Method(
        kind="ps", description=f"{'every rank serves a shard' if sharded else 'rank 0 serves'}, --comm {args.comm}, "
                               f"--mode {args.mode}, {state_bytes / 1e6:.1f} MB of state",
        settings=dict(comm=args.comm, servers=args.servers, mode=args.mode, bucket_mb=args.bucket_mb),
        model=model, step=None, trainers=trainers, group=workers, replicated=False, overlaps=comm.overlaps,
        run_length=2,  # a pull waits for the server's update of the step before: runs of 2 in the yardstick
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
