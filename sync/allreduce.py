"""The all-reduce method's room: GradSync, our gradient sync with DDP's contract (--sync per-param, bucketed,
overlap, ring), the ring kernel (ring_all_reduce) and the two-level sync (HierarchicalSync); pipelined_allreduce
extends GradSync."""
import contextlib
import queue
import threading

import torch
import torch.distributed as dist
import torch.nn as nn

import common
from modes import SYNC_MODES
from sync.buckets import adopt_grad


WIRE_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}
OVERLAPPED = ("overlap", "hierarchical", "pipelined")  # the modes whose buckets start from the gradient hooks
_REGISTRATIONS = [0]  # parameters, buffers and modules registered on any module here (_DdpContract._check_model)
# torch 2.14 renamed the flat reduce-scatter and all-gather; torch >= 2.3 has them under the older names
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _registered(module, name, value):
    _REGISTRATIONS[0] += 1  # returns None: the registered value stays


for _hook in ("parameter", "buffer", "module"):
    getattr(nn.modules.module, f"register_module_{_hook}_registration_hook")(_registered)


def _grad_bucket(params, tail=0):
    """A flat buffer whose views become `params`' gradients, with `tail` more elements after them (pipelined: the
    readiness vector; hierarchical: padding to a multiple of the processes per node); `.grads` is the gradient part."""
    bucket = common.FlatBuffer([*params, params[0].new_zeros(tail)] if tail else params)
    bucket.tail = bucket.views.pop() if tail else None
    del bucket.tensors[len(params):]
    bucket.grads = bucket.flat[:bucket.flat.numel() - tail]
    return bucket


class _Unused:
    """find_unused_parameters=True, DDP's rule: this step's parameters without a gradient here (`missing`) take part
    with their .grad as it is (zeros when None) and the buckets left unfilled start; a bitmap of the parameters used
    here, all-reduced after the buckets (DDP's local_used_map), says which got one nowhere: those keep .grad untouched
    (None stays None, so the optimizer skips them); the others get the average, as if their gradient here were zero."""

    def __init__(self, sync, missing):
        for p in missing:
            if p.grad is None:
                sync.views[id(p)].zero_()
            else:
                adopt_grad(p, sync.views[id(p)])
        if missing and sync.overlapped:
            for i, bucket in enumerate(sync.buckets):
                if sync.filled[i] < len(bucket.tensors):
                    sync.filled[i] = len(bucket.tensors)
                    sync._full(i)
        # the bitmap after every bucket has started, so that every rank issues the collectives in one order
        params, ids = sync.params, {id(p) for p in missing}
        self.unset = [p for p in missing if p.grad is None]
        self.unset_ids = {id(p) for p in self.unset}
        self.index = {id(p): i for i, p in enumerate(params)}
        self.used = torch.tensor([float(id(p) not in ids) for p in params], device=sync.device)
        self.work = dist.all_reduce(self.used, async_op=True)

    def grad_of(self, param, view):
        """`param`'s .grad after the exchange: `view` (the average), or None for a parameter unused everywhere."""
        if id(param) not in self.unset_ids:
            return view
        if self.work is not None:
            self.work.wait()
            self.used, self.work = self.used.tolist(), None
        return view if self.used[self.index[id(param)]] > 0.5 else None


class _DdpContract:
    """GradSync's half that keeps DDP's contract around the exchange (GradSync's docstring lists it), reading the
    state GradSync.__init__ sets."""

    @contextlib.contextmanager
    def no_sync(self):
        """DDP's no_sync(): a backward whose forward ran inside accumulates locally, with no communication; the first
        backward after it synchronizes the accumulated sum."""
        before, self.sync_grads = self.sync_grads, False
        try:
            yield
        finally:
            self.sync_grads = before

    def broadcast_buffers(self):
        """DDP's rule: every forward starts from rank 0's buffers (BatchNorm running statistics)."""
        self._broadcast(self.buffers)

    def _before_model(self, module):
        """The model's forward pre-hook: the model must be the one the sync was built on; DDP's buffer rule."""
        if module is not self.model:
            return  # a copy's forward
        self._check_model()
        if self.buffers_due and self.forward_buffers and not self.driven:
            self.broadcast_buffers()
        if torch.is_grad_enabled():
            self.sync_backward, self.in_backward = self.sync_grads, False  # a new forward: the last backward is over
        self.buffers_due = torch.is_grad_enabled() and self.sync_grads

    def _check_model(self):
        """The model is the one the sync was built on (a buffer may be reassigned): a full check only once something
        registered a parameter, buffer or module anywhere, or a frozen parameter was unfrozen."""
        if self.checked == _REGISTRATIONS[0] and not any(p.requires_grad for p in self.frozen):
            return
        self.checked = _REGISTRATIONS[0]
        now = [(p, p.requires_grad) for p in self.model.parameters()]
        if len(now) != len(self.layout) or any(p is not q or a != b for (p, a), (q, b) in zip(now, self.layout)):
            before = {id(p): grad for p, grad in self.layout}
            changed = [n for n, p in self.model.named_parameters() if before.get(id(p)) != p.requires_grad]
            what = f"parameter {changed[0]} was added, replaced or (un)frozen" if changed else "a parameter was removed"
            raise common.UserError(f"{what} after the gradient sync was built (build the sync on the finished model, "
                                   "as DDP is built)")
        buffers = list(self.model.buffers())
        if len(buffers) != len(self.buffer_list) or any(a is not b for a, b in zip(buffers, self.buffer_list)):
            self.buffer_list, self.buffers = buffers, common.flat_by_dtype(buffers)  # reassigned: DDP reads them anew

    def _backward_starts(self):
        self.syncing = self.sync_backward
        if not self.driven:  # a loop of its own: the sync ends when backward does, as DDP's does
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ends)

    def _backward_ends(self):
        self.in_backward = False
        if self.syncing:
            self._finish()

    def _end_backward(self):
        """The parameters this backward gave no gradient: an error naming them, unless find_unused_parameters
        (_Unused: DDP's rule)."""
        missing = [p for p in self.params if id(p) not in self.ready]
        self.ready = set()
        if missing and not self.find_unused_parameters:
            self.filled = [0] * len(self.buckets)
            names = ", ".join(self.names[id(p)] for p in missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise common.UserError(f"{len(missing)} parameter(s) got no gradient in this step ({names}): like DDP "
                                   "without find_unused_parameters, the manual all-reduce needs every parameter to "
                                   "take part in the loss (pass find_unused_parameters=True, or use another --arch)")
        unused = _Unused(self, missing) if self.find_unused_parameters else None
        self.filled = [0] * len(self.buckets)
        return unused

    @staticmethod
    @torch.no_grad()
    def _broadcast(flats):
        for buffer in flats:
            dist.broadcast(buffer.pack(), src=0)
            if dist.get_rank() != 0:
                buffer.unpack()


class GradSync(_DdpContract):
    """Averages a plain model's gradients over all ranks with one of SYNC_MODES, keeping DDP's contract in any
    training loop (docs/own_loop.md; _DdpContract keeps it):
      - construction makes every parameter (frozen ones too) and every buffer rank 0's;
      - each forward starts from rank 0's buffers (DDP's broadcast_buffers=True; as under DDP, not the forward after
        one under no_grad or inside no_sync()), from a forward pre-hook on the model;
      - when backward ends (an autograd callback, as DDP's reducer uses) .grad holds the average over all ranks,
        however the loop zeroes gradients (optimizer or model .zero_grad(), either set_to_none, or not at all: they
        accumulate, as under DDP); no_sync(): backward accumulates locally, the next one synchronizes the sum;
      - every parameter must get a gradient each step, else an error names it, unless find_unused_parameters=True
        (then _Unused: DDP's rule); a tied parameter is one parameter; a parameter added, replaced or (un)frozen
        after construction is an error (a buffer may be reassigned, as under DDP).
    Every gradient is a view of its bucket with its parameter's strides (DDP's gradient_as_bucket_view; per-param:
    a bucket per tensor): backward accumulates straight into the buckets (adopt_grad when a loop replaced .grad).
    The kit's loop drives the sync itself, so that its clock sees each phase: begin(), broadcast_buffers() before the
    forward, finish() after backward, as train_step does."""
    pipelined = False  # True: the sync applies the update itself, inside the next forward (PipelinedSync)
    averages_parameters = False  # True: parameters, not gradients, are averaged after the update (LocalSGD)
    group = None  # the process group of the exchanges (None: every rank)

    def __init__(self, model, mode=SYNC_MODES[0], bucket_mb=25.0, compress="none", find_unused_parameters=False,
                 broadcast_buffers=True):
        self.mode, self.world_size, self.wire_dtype = mode, dist.get_world_size(), WIRE_DTYPES[compress]
        self.model, self.find_unused_parameters, self.forward_buffers = model, find_unused_parameters, broadcast_buffers
        self.layout = [(p, p.requires_grad) for p in model.parameters()]  # what may not change (_check_model)
        self.frozen, self.checked = [p for p, grad in self.layout if not grad], _REGISTRATIONS[0]
        self.names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device
        # in the order backward produces gradients: the parameters reversed; per-param: a bucket for each tensor
        cap = 0 if mode == "per-param" else bucket_mb * 2 ** 20
        groups = common.split_buckets(self.params[::-1], cap)
        self.buckets = [_grad_bucket(group, self._tail(len(groups), group)) for group in groups]
        self.views = {id(p): view for bucket in self.buckets for p, view in zip(bucket.tensors, bucket.views)}
        self.bucket_index = {id(p): i for i, b in enumerate(self.buckets) for p in b.tensors}
        self.buffer_list = list(model.buffers())
        self.buffers = common.flat_by_dtype(self.buffer_list)
        # until a loop calls begin() (the kit's: driven), every step communicates, overlapped as the mode says
        self.communicates, self.overlapped, self.driven = True, mode in OVERLAPPED, False
        # no_sync() turns sync_grads off; each forward with grad copies it into sync_backward, and says whether the
        # next forward takes rank 0's buffers (DDP's require_backward_grad_sync and require_forward_param_sync)
        self.sync_grads = self.sync_backward = self.buffers_due = self.syncing = True
        self.in_backward, self.ready, self.filled, self.in_flight = False, set(), [0] * len(self.buckets), []
        for p in self.params:
            p.grad = self.views[id(p)]
            p.register_post_accumulate_grad_hook(lambda p, view=self.views[id(p)]: self._grad_ready(p, view))
        # a closure, not a bound method: a deep copy of the model (compute_model's, an EMA's) shares it, never the sync
        model.register_forward_pre_hook(lambda module, args: self._before_model(module), prepend=True)
        self._broadcast(common.flat_by_dtype([*model.parameters(), *model.buffers()]))

    def _tail(self, count, params):
        return 0  # elements after a bucket's gradients

    def begin(self, clock=None, lr=None, *, communicate=True, overlap=True):
        """The kit's loop starts a step at learning rate `lr`, timed by `clock`, with or without communication, its
        buckets starting from the gradient hooks (`overlap`, in the overlapped modes) or after backward."""
        self.clock, self.driven = clock, True
        self.communicates, self.overlapped = communicate, communicate and overlap and self.mode in OVERLAPPED

    def zero_grad(self):
        """Zeroes the gradients for the next backward (in place: they stay views of the buckets)."""
        for bucket in self.buckets:
            bucket.grads.zero_()

    def _grad_ready(self, param, view):
        """The gradient hook, after backward has accumulated into param.grad (`view`: its bucket view)."""
        if not self.communicates:
            return
        if not self.in_backward:
            self.in_backward = True
            self._backward_starts()
        adopt_grad(param, view)
        if not self.syncing:
            return
        if id(param) in self.ready:
            raise common.UserError(f"parameter {self.names[id(param)]} got a second gradient before the sync: "
                                   "like DDP outside no_sync(), the manual all-reduce allows one backward per step")
        self.ready.add(id(param))
        if self.overlapped:
            i = self.bucket_index[id(param)]
            self.filled[i] += 1
            if self.filled[i] == len(self.buckets[i].tensors):
                self._full(i)

    def _full(self, i):
        # Launch strictly in bucket order, so every rank issues the same collectives in the same order.
        while len(self.in_flight) < len(self.buckets) and \
                self.filled[len(self.in_flight)] == len(self.buckets[len(self.in_flight)].tensors):
            self.in_flight.append(self._all_reduce(self.buckets[len(self.in_flight)], async_op=True))

    def finish(self):
        """The kit's loop, after backward: every .grad holds the average over all ranks (a loop that does not call
        begin() needs no call: the sync ends when backward does)."""
        if self.driven:
            self.in_backward = False
            if self.sync_backward:
                self._finish()

    def _finish(self):
        unused = self._end_backward()
        if self.overlapped:  # overlap, hierarchical (an overlapped pipelined step ends in PipelinedSync._finish)
            for work, wire, bucket in self.in_flight:
                work.wait()
                if wire is not bucket.flat:
                    bucket.grads.copy_(wire[:bucket.grads.numel()])
            self.in_flight = []
        else:
            for bucket in self.buckets:
                self._all_reduce(bucket, async_op=False)
        for p in unused.unset if unused is not None else ():
            p.grad = unused.grad_of(p, self.views[id(p)])

    def _wire(self, bucket):
        # Divided before summing, as DDP does; compressed: cast, divide and sum in the wire dtype, cast back.
        wire = bucket.flat if self.wire_dtype is None else bucket.flat.to(self.wire_dtype)
        wire[:bucket.grads.numel()].div_(self.world_size)
        return wire

    def _all_reduce(self, bucket, async_op):
        wire = self._wire(bucket)
        if self.mode == "ring":
            ring_all_reduce(wire)
            work = None
        else:
            work = dist.all_reduce(wire, group=self.group, async_op=async_op)
        if not async_op and wire is not bucket.flat:
            bucket.grads.copy_(wire[:bucket.grads.numel()])
        return work, wire, bucket


# --------------------------------------------------------------------------- --sync ring: our own all-reduce
def _exchange(send, dst, recv, src):
    """Sends `send` to rank `dst` while receiving `recv` from rank `src`; empty chunks are skipped on both ends."""
    ops = [dist.P2POp(dist.isend, send, dst)] if send.numel() else []
    ops += [dist.P2POp(dist.irecv, recv, src)] if recv.numel() else []
    for work in dist.batch_isend_irecv(ops) if ops else []:
        work.wait()


@torch.no_grad()
def ring_all_reduce(flat):
    """In-place sum of the 1-D `flat` over all ranks: reduce-scatter, then all-gather, around the ring of ranks.

    `flat` is cut into world_size chunks whose sizes differ by at most one (some empty when it is shorter
    than the world). Reduce-scatter step s: rank r sends chunk r-s to rank r+1 and adds chunk r-s-1 from
    rank r-1 into its own; after N-1 steps rank r holds the full sum of chunk r+1. All-gather then passes
    the finished chunks on around the ring for N-1 more steps. Each rank sends 2(N-1)/N of the tensor.
    """
    n, r = dist.get_world_size(), dist.get_rank()
    chunks = torch.tensor_split(flat, n)
    right, left = (r + 1) % n, (r - 1) % n
    incoming = torch.empty_like(chunks[0])  # chunk 0 is the largest
    for s in range(n - 1):
        send, mine = chunks[(r - s) % n], chunks[(r - s - 1) % n]
        _exchange(send, right, incoming[:mine.numel()], left)
        mine.add_(incoming[:mine.numel()])
    for s in range(n - 1):
        _exchange(chunks[(r + 1 - s) % n], right, chunks[(r - s) % n], left)
    return flat


# --------------------------------------------------------------------------- --sync hierarchical: two levels
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
    """--sync hierarchical (Horovod's hierarchical mode): overlap's buckets, each all-reduced in two levels on
    N = M nodes x L processes (torchrun numbers ranks node by node: node = rank // L):
      1. reduce-scatter inside the node: local process l ends with the node's sum of shard l (1/L of the bucket);
      2. all-reduce of shard l across the M nodes, among the processes of local rank l: the only stage that crosses
         a node link, L processes x 2(M-1)/M x 1/L = 2(M-1)/M of the bucket through each (a flat ring: 2(N-1)/N);
      3. all-gather inside the node: every process gets every shard.
    Each stage has its own process groups (every rank creates every group, in the same order), and stages 2 and 3
    their own thread (_Relay), which takes the buckets in the order stage 1 started them: every group sees its
    collectives in bucket order on all its members. gloo runs the reduce-scatter as an all-reduce inside the node
    (more bytes, on the node's loopback only). One node, or one process per node: one level, which is `overlap`."""

    def __init__(self, model, bucket_mb=25.0, compress="none", local_size=1, local_rank=None, **contract):
        world, rank = dist.get_world_size(), dist.get_rank()
        if local_rank is not None and rank % local_size != local_rank:
            raise common.UserError(f"--sync hierarchical needs ranks numbered node by node, as torchrun does (rank "
                                   f"{rank} is local rank {local_rank} of {local_size}); use --sync overlap")
        self.local_size, self.nodes = local_size, world // local_size
        super().__init__(model, "hierarchical", bucket_mb, compress, **contract)
        sizes = torch.tensor([local_size, -local_size], device=self.device)
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
        if sizes.tolist() != [local_size, -local_size] or world % local_size:
            raise common.UserError("--sync hierarchical needs the same number of processes on every node "
                                   "(torchrun --nproc-per-node alike everywhere), or use --sync overlap")
        self.levels = 2 if self.nodes > 1 and local_size > 1 else 1
        self.topology = {"nodes": self.nodes, "procs_per_node": local_size, "levels": self.levels}  # results: "layout"
        if self.levels == 2:
            L = local_size
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
