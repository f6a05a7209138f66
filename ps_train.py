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
import torch
import torch.distributed as dist
import torch.nn as nn

import common
import data
import measure

METHOD = "Parameter Server (PS)"
SERVER = 0
COMMS = ("collective", "p2p", "overlap")  # the first is the default


def parse_args(argv=None):
    p = common.make_parser(__doc__.splitlines()[0])
    p.add_argument("--comm", choices=COMMS, default=COMMS[0], help="how parameters and gradients travel "
                   "(see the module docstring)")
    p.add_argument("--bucket-mb", type=common.positive(float), default=25.0,
                   help="flat-buffer size in MiB for --comm collective and overlap")
    p.add_argument("--servers", choices=("1", "all"), default="1",
                   help="1: rank 0 serves, the others train; all: every rank trains and serves a shard")
    p.add_argument("--mode", choices=("sync", "async"), default="sync",
                   help="async: the server applies each gradient as it arrives (one server, its own exchange)")
    name = lambda a: common.variant_output("ps", a.comm, COMMS[0]).replace(  # noqa: E731
        ".json", ("_sharded" if a.servers == "all" else "") + ("_async" if a.mode == "async" else "") + ".json")
    args = common.parse(p, argv, name)
    if args.comm == "p2p" and args.channels_last:
        p.error("--comm p2p sends each tensor as it is and needs contiguous tensors (drop --channels-last "
                "or use --comm collective)")
    if args.mode == "async" and (args.servers != "1" or args.comm != COMMS[0]):
        p.error("--mode async has one server and its own exchange, one packed message each way per step "
                "(drop --servers and --comm)")
    if args.amp and args.amp_dtype == "fp16" and (args.mode == "async" or args.servers == "all"):
        p.error("fp16 loss scaling needs the single synchronous server (use --amp-dtype bf16)")
    return args


# --------------------------------------------------------------------------- what travels, and who owns it
class Layout:
    """The state as served (parameters and buffers in module order, so one module's tensors share a bucket,
    then the fp16 loss scale) and as pushed (gradients in the order backward produces them, then buffers), cut
    into float32 flat buckets, each owned by one rank: the server's, or with sharding the rank owning the
    tensors. Gradients are views of the push buckets: on an owner one division per bucket averages them, on a
    worker backward writes straight into what is pushed."""

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
        """Runs of one owner, each cut into buckets of about `cap` bytes; a bucket knows its owner."""
        runs = []
        for t in tensors:
            if not runs or runs[-1][0] != self.owner[id(t)]:
                runs.append((self.owner[id(t)], []))
            runs[-1][1].append(t)
        buckets = []
        for owner, run in runs:
            for group in common.split_buckets(run, cap, same_dtype=False):
                buckets.append(common.FlatBuffer(group, torch.float32))
                buckets[-1].owner = owner
        return buckets

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
    """Every rank calls pull() then push() each step, in the same order. pull() is skipped while the trainers
    already hold the owners' state (after the epoch's final pull); push() leaves the sums on the owners."""

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


class Async:
    """--mode async: each worker asks for the newest state (a PULL ticket) before computing and sends its
    gradients (a PUSH ticket, with the version it computed on) after; the server answers tickets in the order
    they arrive, applying every push at once. Tickets travel on a gloo group (any-source receive), the state
    and gradients on the main one."""

    def __init__(self, layout, rank, num_workers):
        self.layout, self.rank, self.num_workers, self.trains = layout, rank, num_workers, rank != SERVER
        self.tickets = dist.new_group(backend="gloo")  # every rank must call new_group
        self.version, self.clock, self.active = 0, measure.NoClock(), True
        self.latest = {}  # server: each worker's latest buffers, whose mean it serves

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

    def finish_pull(self):
        pass

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


# --------------------------------------------------------------------------- one step on each side
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


def server_step(comm, optimizer, scaler, lr, clock):
    """The single server's step: serve the parameters, gather the workers' gradients, average them, update."""
    serve(comm, scaler)
    clock.mark("serve")
    comm.push()
    clock.mark("push_wait")  # includes the workers' forward and backward
    update(comm, optimizer, scaler, lr, len(comm.trainers))
    clock.mark("update")


def make_worker_step(model, comm, args, ctx, optimizer=None, scaler=None):
    """A worker's step: pull, forward and backward, push; with --servers all also the update of its own shard
    (`optimizer`, at `lr`). Otherwise the lr is the server's business."""
    criterion = nn.CrossEntropyLoss()

    def train_step(images, targets, clock, lr=None):
        comm.clock = clock
        comm.pull()
        clock.mark("pull")
        with common.autocast(args, ctx):
            logits = model(images)  # overlap: each module first waits for its own pull bucket
            loss = criterion(logits, targets)
        comm.finish_pull()
        clock.mark("compute")
        comm.layout.zero_grad()
        (loss * comm.layout.scale).backward()  # overlap: the gradient hooks push buckets while backward runs
        clock.mark("compute")
        comm.push()
        clock.mark("push")
        if optimizer is not None:
            update(comm, optimizer, scaler, lr, len(comm.trainers))
            clock.mark("update")
        return loss, logits

    return train_step


# --------------------------------------------------------------------------- the yardstick
def measure_overhead(model, comm, optimizer, scaler, args, ctx, info, workers):
    """The yardstick: a worker's step against the same step with a local SGD update and no communication
    while a server waits; runs of 2, because a pull waits for the update of the step before. For --comm
    overlap also the collective (blocking) exchange of the same buckets. Returns the block (None on a server
    that does not train)."""
    kinds = ["comm", "local"] + (["blocking"] if isinstance(comm, Overlap) else [])
    lr, clock = common.lr_at(args, 0), measure.NoClock()
    schedule = measure.overhead_schedule(kinds, args.overhead_pairs, run_length=2)
    sharded = comm.trains and optimizer is not None  # every rank trains and updates its shard
    if not comm.trains:  # the single server serves the steps that communicate
        with measure.preserved(model, optimizer, scaler):
            if isinstance(comm, Async):
                comm.serve((ctx.world_size - 1) * sum(1 for k, _ in schedule if k == "comm"), optimizer,
                           lambda i: lr, clock)
                comm.version, comm.latest = 0, {}
            else:
                for kind, _ in schedule:
                    if kind != "local":
                        server_step(comm, optimizer, scaler, lr, clock)
        return None
    real = make_worker_step(model, comm, args, ctx, optimizer if sharded else None, scaler)
    blocking = Collective(comm.layout, comm.rank, comm.trainers) if isinstance(comm, Overlap) else None
    blocking = blocking and make_worker_step(model, blocking, args, ctx, optimizer if sharded else None, scaler)
    local_opt, local_scaler = common.make_optimizer(args, model.parameters()), common.make_scaler(args, ctx)
    criterion = nn.CrossEntropyLoss()

    def local(images, targets, clock):
        with common.autocast(args, ctx):
            loss = criterion(model(images), targets)
        comm.layout.zero_grad()
        local_scaler.scale(loss).backward()
        local_scaler.step(local_opt)
        local_scaler.update()

    def hooks_off(fn):  # the overlap transport's hooks stay quiet: nothing is pushed from backward
        def run(images, targets):
            comm.active = False
            try:
                fn(images, targets, clock)
            finally:
                comm.active = True
        return run

    steps = {"comm": lambda x, y: real(x, y, clock, lr), "local": hooks_off(local), "blocking": hooks_off(blocking)}
    with measure.preserved(model, *([optimizer] if sharded else [])):
        overhead = measure.measure_overhead(ctx, args, {k: steps[k] for k in kinds},
                                            *measure.fixed_batch(args, info, ctx), group=workers, run_length=2)
    return overhead


def messages_per_step(comm, layout, args):
    """Messages per training step: per tensor and peer (p2p), per bucket (collective: one call each), per
    worker two tickets and every bucket each way (async)."""
    if args.mode == "async":
        return comm.num_workers * (2 + len(layout.pull) + len(layout.push))
    if args.comm == "p2p":
        return sum(len(comm.peers(b.owner)) * len(b.tensors) for b in layout.pull + layout.push)
    return len(layout.pull) + len(layout.push)


# --------------------------------------------------------------------------- epochs
def serve_epoch(comm, optimizer, scaler, epoch, steps, args, ctx):
    """The single server's epoch: `steps` steps (async: steps x workers gradients), then the final pull, as part
    of the last step. Returns [serve, push wait, update] seconds per step, staleness [mean, max], the lrs."""
    clock, lrs = measure.StepClock(ctx.device), [common.lr_at(args, epoch - 1 + s / steps) for s in range(steps)]
    warmup = min(args.warmup_steps, steps - 1) if epoch == 1 else 0
    if isinstance(comm, Async):
        clock.begin()
        workers = ctx.world_size - 1
        stale = comm.serve(steps * workers, optimizer, lambda i: common.lr_at(args, epoch - 1 + i / workers / steps),
                           clock)
        sums, per = clock.phase_sums(), steps
        Collective(comm.layout, ctx.rank, range(1, ctx.world_size)).pull()  # the epoch's model, to everyone
        times = [sums.get("serve", 0.0) / per, sums.get("wait", 0.0) / per,
                 (sums.get("update", 0.0) + sums.get("receive", 0.0)) / per]
        return times, [sum(stale) / len(stale), max(stale)], lrs
    for step in range(steps):
        clock.begin()
        server_step(comm, optimizer, scaler, lrs[step], clock)
    serve(comm, scaler)
    clock.mark("serve")
    sums = clock.phase_sums(skip=warmup)
    return [sums.get(k, 0.0) / (steps - warmup) for k in ("serve", "push_wait", "update")], [0.0, 0.0], lrs


def main(argv=None):
    args = parse_args(argv)
    common.check_output_path(args.output)
    ctx = common.setup_distributed(args)
    try:
        sharded = args.servers == "all"
        if ctx.world_size < 2 and not sharded:
            raise common.UserError("the parameter server needs at least 2 processes, a server and a worker "
                                   "(run with torchrun --nproc_per_node=2 or more)")
        trainers = list(range(ctx.world_size)) if sharded else list(range(1, ctx.world_size))
        is_server, trains = ctx.rank == SERVER and not sharded, ctx.rank in trainers
        workers = None if sharded else dist.new_group(ranks=trainers)  # every rank must call new_group
        ds = data.open_data(args, ctx, len(trainers))  # the trainers shard the training set among themselves
        info = ds.info
        train_loader = data.train_loader(ds, args, ctx, len(trainers), trainers.index(ctx.rank)) if trains else None
        val_loader = data.val_loader(ds, args, ctx, ctx.world_size, ctx.rank)  # the server validates too
        model, weights = common.build_model(args, ctx, info.num_classes)
        params = [p for p in model.parameters() if p.requires_grad]
        layout = Layout(model, args.bucket_mb, shard_owners(params, ctx.world_size) if sharded else None)
        comm = Async(layout, ctx.rank, len(trainers)) if args.mode == "async" else \
            make_transport(args.comm, layout, model, ctx.rank, trainers)
        owned = layout.owned_params(ctx.rank)
        optimizer = common.make_optimizer(args, owned) if owned else None
        scaler = common.make_scaler(args, ctx)
        step = make_worker_step(model, comm, args, ctx, optimizer if sharded else None, scaler) if trains else None
        writer = trainers[0]
        state_bytes = sum(4 * t.numel() for t in layout.params + layout.buffers)
        busiest = max(sum(4 * p.numel() for p in layout.owned_params(r)) for r in range(ctx.world_size))
        results = common.Results(args.output, METHOD, "ps", ctx, args, info, writer=ctx.rank == writer,
                                 trainers=len(trainers), num_workers=len(trainers), comm=args.comm,
                                 mode=args.mode, servers=args.servers, weights=weights, bucket_mb=args.bucket_mb,
                                 state_bytes=state_bytes, largest_shard_bytes=busiest,
                                 gradient_bytes=sum(4 * p.numel() for p in layout.params),
                                 messages_per_step=messages_per_step(comm, layout, args))
        common.log(ctx, f"{METHOD} ({'every rank serves a shard' if sharded else 'rank 0 serves'}, --comm "
                        f"{args.comm}, --mode {args.mode}): {len(trainers)} trainers ({ctx.backend}, "
                        f"{common.device_name(ctx.device)}), {args.arch} on {info.name} ({info.train_size} train / "
                        f"{info.val_size} val images, {info.image_size}px), {state_bytes / 1e6:.1f} MB of state, "
                        f"{info.steps} steps/epoch, batch {args.batch_size}/trainer", rank=writer)
        resumed = common.load_checkpoint(args, ctx, owner=ctx.rank, writer=writer)
        if resumed:  # every owner takes its training state back; the trainers get it with the first pull
            if optimizer is not None:
                for part, obj in zip(("model", "optimizer", "scaler"), (model, optimizer, scaler)):
                    obj.load_state_dict(resumed[1][part])
            results.resume(resumed[2])
            common.log(ctx, f"resumed after epoch {resumed[0]} from {common.checkpoint_dir(args)}", rank=writer)
        elif args.overhead_pairs:
            overhead = measure_overhead(model, comm, optimizer, scaler, args, ctx, info, workers)
            if trains:
                results.update(comm_overhead=overhead)
                common.log(ctx, f"communication overhead: {1e3 * overhead['overhead']:.1f} ms/step "
                                f"({100 * overhead['overhead_share']:.0f}% of a "
                                f"{1e3 * overhead['step_time']:.1f} ms step)", rank=writer)
        final_pull = Collective(layout, ctx.rank, trainers) if args.mode == "async" else comm
        if is_server:
            serve(final_pull, scaler)  # the initial state, before any clock (as DDP broadcasts at wrap)
        else:
            final_pull.pull()
            final_pull.finish_pull()
        for epoch in range(1 + (resumed[0] if resumed else 0), args.epochs + 1):
            link = measure.read_link_bytes(ctx)
            server = [0.0] * 5 + [0.0] * info.steps
            if is_server:
                times, stale, lrs = serve_epoch(comm, optimizer, scaler, epoch, info.steps, args, ctx)
                server = times + stale + lrs
            else:
                def end_of_epoch(clock):  # the epoch's last update, so every trainer validates the same model
                    final_pull.fresh = False if args.mode == "async" else final_pull.fresh
                    final_pull.pull()
                    final_pull.finish_pull()
                    clock.mark("pull")
                record = measure.run_epoch(ctx, args, epoch, train_loader, info.steps, step, group=workers,
                                           end_of_epoch=end_of_epoch)
            link = measure.busiest_link(ctx, link, info.steps)
            # The server's clocks, staleness and learning rates, to every rank (the others contribute zeros).
            server = measure.all_reduce(torch.tensor(server, dtype=torch.float64, device=ctx.device)).tolist()
            val_loss, val_accuracy = measure.evaluate(model, val_loader, ctx, args)
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict()} if optimizer is not None else None
            if is_server:
                common.log(ctx, f"server epoch {epoch}: per step: serve {1e3 * server[0]:.1f}ms, wait "
                                f"{1e3 * server[1]:.1f}ms, aggregate+update {1e3 * server[2]:.1f}ms"
                                + (f", staleness {server[3]:.2f} (max {server[4]:.0f})" if args.mode == "async"
                                   else ""))
                common.checkpoint_epoch(args, ctx, epoch, results, state=state)
                continue
            record.update(avg_comm_time_pull=record["phase_times"]["pull"],
                          avg_comm_time_push=record["phase_times"]["push"],
                          avg_comm_time=record["phase_times"]["pull"] + record["phase_times"]["push"],
                          link=link, val_loss=val_loss, val_accuracy=val_accuracy)
            if not sharded:
                record.update(avg_server_serve_time=server[0], avg_server_push_wait_time=server[1],
                              avg_server_update_time=server[2], lrs=server[5:])
            if args.mode == "async":
                record.update(staleness_mean=server[3], staleness_max=server[4],
                              updates_per_second=info.steps * len(trainers) / record["train_time"])
            results.add_epoch(record)
            common.checkpoint_epoch(args, ctx, epoch, results, state=state)
            common.log(ctx, common.epoch_line(record), rank=writer)
            common.warn_if_data_bound(ctx, record, rank=writer)
        results.finish()
        common.log(ctx, f"wrote {args.output}", rank=writer)
        common.cleanup_distributed(barrier=True)
    finally:
        common.cleanup_distributed()


if __name__ == "__main__":
    common.run_main(main)
