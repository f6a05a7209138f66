"""--sync hierarchical: overlap's buckets, each all-reduced in two levels (Horovod's hierarchical mode)."""
import queue
import threading

import torch
import torch.distributed as dist

import common
from sync.allreduce import GradSync


# torch 2.14 renamed the flat reduce-scatter and all-gather; torch >= 2.3 has them under the older names
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _Exchange:
    """One bucket's two-level all-reduce on its way through the stages; wait() returns when the last has ended."""

    def __init__(self, wire, shard):
        self.wire, self.shard, self.work, self.error, self.last_started = wire, shard, None, None, threading.Event()

    def wait(self):
        self.last_started.wait()
        if self.error is not None:
            raise self.error
        self.work.wait()


class _Relay:
    """A thread that takes exchanges in the order they are handed to it, waits for each one's current stage to end
    and starts its next (`stage(exchange) -> work`, a collective on this stage's own group), then hands it on to
    `then`: every member of a stage's group starts that stage's collectives in the order the buckets came."""

    def __init__(self, stage, device, then=None):
        self.stage, self.then, self.queue = stage, then, queue.Queue()
        threading.Thread(target=self._run, args=(device,), daemon=True).start()

    def put(self, exchange):
        self.queue.put(exchange)

    def _run(self, device):
        with common.comm_stream(device):
            while True:
                exchange = self.queue.get()
                if exchange.error is None:
                    try:
                        exchange.work.wait()
                        exchange.work = self.stage(exchange)
                    except BaseException as e:  # noqa: BLE001 - raised again by the training thread's wait
                        exchange.error = e
                if self.then is not None:
                    self.then.put(exchange)
                else:
                    exchange.last_started.set()


class HierarchicalSync(GradSync):
    """--sync hierarchical: overlap's buckets, started from the gradient hooks in bucket order, each all-reduced in
    two levels on N = M nodes x L processes (torchrun numbers ranks node by node: node = rank // L):
      1. reduce-scatter inside the node: local process l ends with the node's sum of shard l (1/L of the bucket);
      2. all-reduce of shard l across the M nodes, among the processes of local rank l: the only stage that crosses
         a node link, L processes x 2(M-1)/M x 1/L = 2(M-1)/M of the bucket through each (a flat ring: 2(N-1)/N);
      3. all-gather inside the node: every process gets every shard.
    Each stage has its own process groups (every rank creates every group, in the same order), and stages 2 and 3
    their own thread (_Relay), which takes the buckets in the order stage 1 started them, waits for the stage before
    and starts its own: every group sees its collectives in bucket order on all its members, whatever the timing.
    gloo runs the reduce-scatter as an all-reduce inside the node (torch's gloo has no real one): more bytes, but on
    the node's loopback, never on its link; NCCL runs both as they are. One node, or one process per node: one
    level, which is `overlap`.
    """

    def __init__(self, model, bucket_mb=25.0, compress="none", local_size=1, **contract):
        world = dist.get_world_size()
        self.local_size, self.nodes = local_size, world // local_size
        super().__init__(model, "hierarchical", bucket_mb, compress, **contract)
        sizes = torch.tensor([local_size, -local_size], device=self.device)
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
        if sizes.tolist() != [local_size, -local_size] or world % local_size:
            raise common.UserError("--sync hierarchical needs the same number of processes on every node "
                                   "(torchrun --nproc-per-node alike everywhere), or use --sync overlap")
        self.levels = 2 if self.nodes > 1 and local_size > 1 else 1
        if self.levels == 2:
            L, rank = local_size, dist.get_rank()
            nodes = [list(range(n * L, (n + 1) * L)) for n in range(self.nodes)]
            self.local = rank % L
            self.node_group, _ = dist.new_subgroups_by_enumeration(nodes)  # stage 1
            self.across_group, _ = dist.new_subgroups_by_enumeration([list(range(i, world, L)) for i in range(L)])
            self.gather_group, _ = dist.new_subgroups_by_enumeration(nodes)  # stage 3: its own group and thread
            self.gather = _Relay(lambda x: ALL_GATHER(x.wire, x.shard, group=self.gather_group, async_op=True),
                                 self.device)
            self.across = _Relay(lambda x: dist.all_reduce(x.shard, group=self.across_group, async_op=True),
                                 self.device, then=self.gather)

    def _tail(self, count, params):
        return -sum(p.numel() for p in params) % self.local_size  # equal shards

    def _all_reduce(self, bucket, async_op):
        if self.levels == 1:
            return super()._all_reduce(bucket, async_op)
        wire = self._wire(bucket)
        x = _Exchange(wire, wire.view(self.local_size, -1)[self.local])
        x.work = REDUCE_SCATTER(x.shard, wire, group=self.node_group, async_op=True)  # in place: shard l of wire
        if async_op:
            self.across.put(x)  # stages 2 and 3 follow in their threads
            return x, wire, bucket
        x.work.wait()
        dist.all_reduce(x.shard, group=self.across_group)
        ALL_GATHER(wire, x.shard, group=self.gather_group)
        if wire is not bucket.flat:
            bucket.grads.copy_(wire[:bucket.grads.numel()])
        return None, wire, bucket
