"""The parameter server's layout: what travels (flat float32 buckets) and which rank owns each (the server, or with
--servers all a shard of every rank); --comm pipelined's partitions."""
import torch

import common
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


def make_layout(comm, model, bucket_mb, world_size, sharded, servers=None):
    """The layout of `comm`: pipelined's partitions, or the buckets of the others; sharded over every rank, or
    (pipelined, --server-ranks) over the ranks `servers`."""
    if comm == "pipelined":
        return Partitions(model, bucket_mb, servers or (list(range(world_size)) if sharded else [SERVER]))
    params = [p for p in model.parameters() if p.requires_grad]
    return Layout(model, bucket_mb, shard_owners(params, world_size) if sharded else None)


def messages_per_step(comm, layout, args):
    """Messages per training step: per tensor and peer (p2p), per partition and peer (pipelined), per bucket
    (collective: one call each), per worker two tickets, a version, a receipt and every bucket each way (async)."""
    if args.mode == "async":
        return comm.num_workers * (4 + len(layout.pull) + len(layout.push))
    if args.comm in ("p2p", "pipelined"):
        return sum(len(comm.peers(b.owner)) * (len(b.tensors) if args.comm == "p2p" else 1)
                   for b in layout.pull + layout.push)
    return len(layout.pull) + len(layout.push)
