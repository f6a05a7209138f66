"""The parameter server's exchange: what travels (Layout: flat float32 buckets, each owned by the server or, with
--servers all, by the rank owning its tensors), how (Transport: pull and push) and the guide's two transports,
--comm p2p (its original) and collective (its improvement, the default); --comm overlap (collective from hooks,
BytePS-style); the results' records (ServerStats, the servers' figures; exchange_sizes, epoch_fields). The other
transports build on these: sync/ps_pipelined.py, ps_servers.py, ps_async.py."""
import dataclasses
import itertools

import torch
import torch.distributed as dist

import common
import measure
from sync.buckets import adopt_grad

SERVER = 0


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
        runs = itertools.groupby(tensors, key=lambda t: self.owner[id(t)])
        return [Bucket(group, owner, len(group) if grads else 0)
                for owner, run in runs for group in common.split_buckets(list(run), cap, False)]

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


def shard_owners(params, world_size):
    """--servers all: whole tensors, contiguous in backward's order, balanced by bytes over the ranks."""
    total, owners, done = sum(p.numel() for p in params), {}, 0
    for p in params[::-1]:
        owners[id(p)] = min(world_size - 1, int(world_size * (done + p.numel() / 2) / total))
        done += p.numel()
    return owners


def exchange_sizes(layout, comm, args, world_size):
    """The results' record of what travels: the state's bytes, the largest shard's, the gradients', the messages
    per step."""
    return dict(state_bytes=sum(4 * t.numel() for t in layout.params + layout.buffers),
                largest_shard_bytes=max(sum(4 * p.numel() for p in layout.owned_params(r)) for r in range(world_size)),
                gradient_bytes=sum(4 * p.numel() for p in layout.params),
                messages_per_step=messages_per_step(comm, layout, args))


def messages_per_step(comm, layout, args):
    """Messages per training step: per tensor and peer (p2p), per partition and peer (pipelined), per bucket
    (collective: one call each), per worker two tickets, a version, a receipt and every bucket each way (async)."""
    if args.mode == "async":
        return comm.num_workers * (4 + len(layout.pull) + len(layout.push))
    if args.comm in ("p2p", "pipelined"):
        return sum(len(comm.peers(b.owner)) * (len(b.tensors) if args.comm == "p2p" else 1)
                   for b in layout.pull + layout.push)
    return len(layout.pull) + len(layout.push)


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

    def share(self, ctx, steps, servers=1):
        """Every rank calls it (the trainers with zeros): the server's figures (the mean of `servers` servers'), on
        every rank."""
        packed = torch.tensor([*(getattr(self, k) for k in self.SCALARS), *(self.lrs or [0.0] * steps)],
                              dtype=torch.float64, device=ctx.device)
        values = (measure.all_reduce(packed) / servers).tolist()
        return ServerStats(*values[:len(self.SCALARS)], lrs=values[len(self.SCALARS):])

    def describe(self, asynchronous=False):
        """The server's epoch line, per step."""
        line = f"serve {1e3 * self.serve:.1f}ms, wait {1e3 * self.push_wait:.1f}ms, aggregate+update " \
               f"{1e3 * self.update:.1f}ms"
        return line + (f", staleness {self.staleness_mean:.2f} (max {self.staleness_max:.0f})" if asynchronous else "")


def epoch_fields(record, server, trainers, asynchronous=False):
    """The results' per-epoch PS fields, on a trainer: its pulls' and pushes' times (from its epoch `record`),
    the servers' figures (`server`, shared; None when every rank serves a shard), async's staleness and rate."""
    phases = record["phase_times"]
    out = dict(avg_comm_time_pull=phases["pull"], avg_comm_time_push=phases["push"],
               avg_comm_time=phases["pull"] + phases["push"])
    if server is not None:
        out.update(avg_server_serve_time=server.serve, avg_server_push_wait_time=server.push_wait,
                   avg_server_update_time=server.update, lrs=server.lrs)
    if getattr(server, "links", None):
        out.update(link_by_role=server.links)
    if asynchronous:
        out.update(staleness_mean=server.staleness_mean, staleness_max=server.staleness_max,
                   updates_per_second=record["steps"] * trainers / record["train_time"])
    return out


class Transport:
    """How the state and the gradients travel: every rank calls pull() (skipped while the trainers hold the owners'
    state already) then push() (the sums left on the owners) each step, in the same order; final_pull() (every
    rank) hands the trainers the owners' newest state, end_epoch() (the trainers) what the epoch's last step owes.
    A server that does not train runs ps_train.server_step on these, or its own (own_server: serve_step, ...)."""
    overlaps = False  # pushes and pulls overlap backward and forward: the yardstick also times blocking_twin()
    updates_itself = False  # the owners' updates happen inside the exchange (pipelined), not in the step
    own_server = asynchronous = False  # asynchronous: the server serves a whole epoch at once (serve_epoch)

    def __init__(self, layout, rank, trainers):
        self.layout, self.rank, self.trainers = layout, rank, list(trainers)
        self.trains = rank in self.trainers
        self.fresh, self.active, self.clock, self.lr = False, True, measure.NoClock(), None

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

    def final_pull(self):
        self.pull()
        self.finish_pull()

    def end_epoch(self):
        self.final_pull()

    def flush(self):
        """Ends every exchange a step left in flight (pipelined)."""

    def server_figures(self, sums, timed, lrs):
        """A server's figures per step, from its phase sums over `timed` steps."""
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

    def blocking_twin(self):
        """The transport the yardstick's "blocking" kind exchanges the same buckets with, after backward."""
        return Collective(self.layout, self.rank, self.trainers)

    def _pull(self):
        if not self.trains:
            return super()._pull()
        self.pending = {i: dist.broadcast(b.pack() if self.rank == b.owner else b.flat, src=b.owner, async_op=True)
                        for i, b in enumerate(self.layout.pull)}

    def finish_pull(self):
        self._wait_pull(sorted(self.pending))

    def _wait_pull(self, indices):
        for i in indices:
            if i in self.pending and self.active:
                self._take_pull(i)

    @measure.phase("pull", after="compute")
    @torch.no_grad()
    def _take_pull(self, i):
        """Waits for pull bucket `i` and takes it into the model."""
        self.pending.pop(i).wait()
        if self.rank != self.layout.pull[i].owner:
            self.layout.pull[i].unpack()

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
