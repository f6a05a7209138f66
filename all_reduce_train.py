"""Manual All-Reduce: our own gradient synchronization on a plain (non-DDP) model.

    torchrun --nproc_per_node=4 all_reduce_train.py --epochs 3 --batch-size 64 --workers 16 --data-dir ./ --backend nccl

Sync strategy: every rank all-reduces its gradients and divides by the world size, and broadcasts rank 0's
buffers before each forward, as DDP does. --sync chooses how:
  per-param     one all-reduce per gradient tensor after backward (the naive version)
  bucketed      gradients live in ~--bucket-mb flat buffers, one blocking all-reduce per bucket after backward
  overlap       (default) the same buckets, each all-reduced asynchronously from gradient hooks as soon as
                backward has filled it, in reverse parameter order, as DDP does
  ring          the buckets, with our own ring all-reduce (reduce-scatter + all-gather) of point-to-point sends
  pipelined     hidden behind the next forward too (P3, ByteScheduler): each bucket (a partition) is updated when
                its exchange ends, the next forward waits module by module for the partitions it needs, and the
                ones it needs first are sent first, in an order every rank agrees on (PipelinedSync)
  hierarchical  overlap with a two-level all-reduce per bucket: reduce-scatter inside each node, all-reduce of each
                process's shard across nodes, all-gather inside the node (Horovod's hierarchical mode): each node
                link carries 2(M-1)/M of the gradients on M nodes, the flat ring's 2(N-1)/N on N processes
--compress fp16|bf16 casts each bucket before the all-reduce and back after, as DDP's compression hooks do.
In a training loop of your own every sync keeps DDP's contract (zero_grad, no_sync, unused parameters, buffers):
docs/own_loop.md.
Writes results_all_reduce.json (--sync overlap) or results_all_reduce_<sync>.json unless --output is given.
"""
import collections
import contextlib
import queue
import threading

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.optim.sgd import sgd as sgd_update

import common
import data
import driver
import measure
from modes import DEFAULT_BUCKET_MB, SYNC_MODES, variant_output

COMPRESSION = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# torch 2.14 renamed the flat reduce-scatter and all-gather; torch >= 2.3 has them under the older names
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def parse_args(argv=None):
    p = common.make_parser(__doc__, lambda a: variant_output("all_reduce", a.sync, SYNC_MODES[0]))
    p.add_argument("--sync", choices=SYNC_MODES, default=SYNC_MODES[0], help="how gradients are synchronized")
    p.add_argument("--bucket-mb", type=common.positive(float), default=DEFAULT_BUCKET_MB,
                   help="gradient bucket size in MiB (not per-param); pipelined: the partition size")
    p.add_argument("--compress", choices=tuple(COMPRESSION), default="none",
                   help="dtype gradients travel in (bucketed modes), as DDP's fp16/bf16 compression hooks")
    args = common.parse(p, argv)
    if args.compress != "none" and args.sync == "per-param":
        p.error("--compress needs buckets (use --sync bucketed, overlap, ring, pipelined or hierarchical)")
    return args


# --------------------------------------------------------------------------- communication primitives
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


# --------------------------------------------------------------------------- gradient synchronization
def _grad_bucket(params, tail=0):
    """A flat buffer whose views become `params`' gradients, with `tail` more elements after them (pipelined: the
    readiness vector; hierarchical: padding to a multiple of the processes per node); `.grads` is the gradient part."""
    bucket = common.FlatBuffer([*params, params[0].new_zeros(tail)] if tail else params)
    bucket.tail = bucket.views.pop() if tail else None
    del bucket.tensors[len(params):]
    bucket.grads = bucket.flat[:bucket.flat.numel() - tail]
    return bucket




OVERLAPPED = ("overlap", "hierarchical", "pipelined")  # the modes whose buckets start from the gradient hooks
_REGISTRATIONS = [0]  # parameters, buffers and modules registered on any module of this process (GradSync._check_model)


def _registered(module, name, value):
    _REGISTRATIONS[0] += 1  # returns None: the registered value stays


for _hook in ("parameter", "buffer", "module"):
    getattr(nn.modules.module, f"register_module_{_hook}_registration_hook")(_registered)


def adopt_grad(param, view):
    """DDP's reducer rule: a gradient that is not its bucket view any more (optimizer.zero_grad() set it to None, so
    backward made a fresh one; or a loop assigned its own) is copied into the view, which becomes .grad again. While
    the views stay, nothing is copied."""
    if param.grad is not view:
        view.copy_(param.grad)
        param.grad = view


class _Unused:
    """find_unused_parameters=True, DDP's rule: this step's parameters without a gradient here take part with their
    .grad as it is (zeros when None), and a bitmap of the parameters used here, all-reduced after the buckets (DDP's
    local_used_map), says which got one nowhere: those keep .grad untouched (None stays None, so the optimizer skips
    them); the others get the average, as if their gradient here were zero."""

    def __init__(self, params, missing, device):
        ids = {id(p) for p in missing}
        self.unset = [p for p in missing if p.grad is None]
        self.unset_ids = {id(p) for p in self.unset}
        self.index = {id(p): i for i, p in enumerate(params)}
        self.used = torch.tensor([float(id(p) not in ids) for p in params], device=device)
        self.work = dist.all_reduce(self.used, async_op=True)

    def grad_of(self, param, view):
        """`param`'s .grad after the exchange: `view` (the average), or None for a parameter unused everywhere."""
        if id(param) not in self.unset_ids:
            return view
        if self.work is not None:
            self.work.wait()
            self.used, self.work = self.used.tolist(), None
        return view if self.used[self.index[id(param)]] > 0.5 else None


class GradSync:
    """Averages a plain model's gradients over all ranks with one of SYNC_MODES, keeping DDP's contract in any
    training loop (docs/own_loop.md):
      - construction makes every parameter (frozen ones too) and every buffer rank 0's;
      - each forward starts from rank 0's buffers (DDP's broadcast_buffers=True; as under DDP, not the forward after
        one under no_grad or inside no_sync()), from a forward pre-hook on the model;
      - when backward ends (an autograd callback, as DDP's reducer uses) .grad holds the average over all ranks,
        however the loop zeroes gradients: optimizer.zero_grad() with either set_to_none, model.zero_grad(), or not
        at all (they accumulate, as under DDP);
      - no_sync(): backward accumulates locally; the first backward after it synchronizes the sum;
      - every parameter must get a gradient each step, else an error names it, unless find_unused_parameters=True
        (then _Unused: DDP's rule); a tied parameter is one parameter; a parameter added, replaced or (un)frozen
        after construction is an error (a buffer may be reassigned, as under DDP).
    In the bucketed modes every gradient is a view of its bucket with its parameter's strides (DDP's
    gradient_as_bucket_view): backward accumulates straight into the buckets, nothing is copied while the views stay
    (adopt_grad otherwise). The kit's loop drives the sync itself, so that its clock sees each phase: a loop that
    calls begin() calls broadcast_buffers() before the forward and finish() after backward, as train_step does.
    """
    pipelined = False  # True: the sync applies the update itself, inside the next forward (PipelinedSync)
    group = None  # the process group of the exchanges (None: every rank)

    def __init__(self, model, mode=SYNC_MODES[0], bucket_mb=25.0, compress="none", find_unused_parameters=False,
                 broadcast_buffers=True):
        self.mode, self.world_size, self.wire_dtype = mode, dist.get_world_size(), COMPRESSION[compress]
        self.model, self.find_unused_parameters, self.forward_buffers = model, find_unused_parameters, broadcast_buffers
        self.layout = [(p, p.requires_grad) for p in model.parameters()]  # what may not change (_check_model)
        self.frozen, self.checked = [p for p, grad in self.layout if not grad], _REGISTRATIONS[0]
        self.names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device
        reverse = self.params[::-1]  # the order backward produces gradients in
        groups = [] if mode == "per-param" else common.split_buckets(reverse, bucket_mb * 2 ** 20)
        self.buckets = [_grad_bucket(group, self._tail(len(groups), group)) for group in groups]
        self.views = {}
        for bucket in self.buckets:
            for p, view in zip(bucket.tensors, bucket.views):
                p.grad = self.views[id(p)] = view
        self.bucket_index = {id(p): i for i, b in enumerate(self.buckets) for p in b.tensors}
        self.buffer_list = list(model.buffers())
        self.buffers = common.flat_by_dtype(self.buffer_list)
        self.kind = "comm"  # the step's kind (see begin)
        self.driven = False  # True once a loop calls begin(): it then broadcasts the buffers and finishes itself
        # no_sync() turns sync_grads off; each forward with grad copies it into sync_backward, and says whether the
        # next forward takes rank 0's buffers (DDP's require_backward_grad_sync and require_forward_param_sync)
        self.sync_grads = self.sync_backward = self.buffers_due = self.syncing = True
        self.in_backward, self.unused = False, None
        self.ready, self.filled, self.in_flight = set(), [0] * len(self.buckets), []
        for p in self.params:
            p.register_post_accumulate_grad_hook(lambda p, view=self.views.get(id(p)): self._grad_ready(p, view))
        # a closure, not a bound method: a deep copy of the model (compute_model's, an EMA's) shares it, never the sync
        model.register_forward_pre_hook(lambda module, args: self._before_model(module), prepend=True)
        self._broadcast(common.flat_by_dtype([*model.parameters(), *model.buffers()]))

    def _tail(self, count, params):
        return 0  # elements after a bucket's gradients

    @contextlib.contextmanager
    def no_sync(self):
        """DDP's no_sync(): a backward whose forward ran inside accumulates the gradients locally, with no
        communication; the first backward after it synchronizes the accumulated sum."""
        before, self.sync_grads = self.sync_grads, False
        try:
            yield
        finally:
            self.sync_grads = before

    def begin(self, kind, clock=None, lr=None):
        """A step of `kind` at learning rate `lr` starts: "comm" synchronizes as the mode says, "blocking" the same
        buckets after backward, "local" not at all (the yardstick's kinds). The kit's loop calls it."""
        self.kind, self.driven = kind, True

    def zero_grad(self):
        """Zeroes the gradients for the next backward (in place: they stay views of the buckets)."""
        for bucket in self.buckets:
            bucket.grads.zero_()
        for p in self.params if not self.buckets else ():
            p.grad = None

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
            self.sync_backward = self.sync_grads
        self.buffers_due = torch.is_grad_enabled() and self.sync_grads

    def _check_model(self):
        """The model is the one the sync was built on (a buffer may be reassigned). One look at a counter and at the
        frozen parameters while nothing registered a parameter, buffer or module anywhere; then a full check. (A
        parameter frozen later gets no gradient: backward names it.)"""
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

    def _grad_ready(self, param, view):
        """The gradient hook, after backward has accumulated into param.grad (`view`: its bucket view, if any)."""
        if self.kind == "local":
            return
        if not self.in_backward:
            self.in_backward = True
            self._backward_starts()
        if view is not None and param.grad is not view:
            adopt_grad(param, view)
        if not self.syncing:
            return
        if id(param) in self.ready:
            raise common.UserError(f"parameter {self.names[id(param)]} got a second gradient before the sync: "
                                   "like DDP outside no_sync(), the manual all-reduce allows one backward per step")
        self.ready.add(id(param))
        if self.kind == "comm" and self.mode in OVERLAPPED:
            i = self.bucket_index[id(param)]
            self.filled[i] += 1
            if self.filled[i] == len(self.buckets[i].tensors):
                self._full(i)

    def _backward_starts(self):
        self.syncing = self.sync_backward
        if not self.driven:  # a loop of its own: the sync ends when backward does, as DDP's does
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ends)

    def _backward_ends(self):
        self.in_backward = False
        if self.syncing:
            self._finish()

    def _full(self, i):
        # Launch strictly in bucket order, so every rank issues the same collectives in the same order.
        while len(self.in_flight) < len(self.buckets) and \
                self.filled[len(self.in_flight)] == len(self.buckets[len(self.in_flight)].tensors):
            self.in_flight.append(self._all_reduce(self.buckets[len(self.in_flight)], async_op=True))

    def _end_backward(self):
        """The parameters this backward gave no gradient: an error naming them; with find_unused_parameters, their
        .grad as it is (zeros if None) goes into their buckets, the buckets left unfilled start (_Unused)."""
        missing = [p for p in self.params if id(p) not in self.ready]
        self.ready = set()
        if missing and not self.find_unused_parameters:
            self.filled = [0] * len(self.buckets)
            names = ", ".join(self.names[id(p)] for p in missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise common.UserError(f"{len(missing)} parameter(s) got no gradient in this step ({names}): like DDP "
                                   "without find_unused_parameters, the manual all-reduce needs every parameter to "
                                   "take part in the loss (pass find_unused_parameters=True, or use another --arch)")
        for p in missing:
            view = self.views.get(id(p))
            if view is not None and p.grad is None:
                view.zero_()
            elif view is not None:
                adopt_grad(p, view)
        if missing and self.kind == "comm" and self.mode in OVERLAPPED:
            for i, bucket in enumerate(self.buckets):
                if self.filled[i] < len(bucket.tensors):
                    self.filled[i] = len(bucket.tensors)
                    self._full(i)
        self.filled = [0] * len(self.buckets)
        # after every bucket has started, so that every rank issues the collectives in one order
        return _Unused(self.params, missing, self.device) if self.find_unused_parameters else None

    def finish(self):
        """The kit's loop, after backward: leaves every parameter's .grad holding the average over all ranks. (A loop
        that does not call begin() needs no call: the sync ends when backward does.)"""
        if self.driven:
            self.in_backward = False
            if self.sync_backward:
                self._finish()

    def _finish(self):
        self.unused = unused = self._end_backward()
        if self.mode == "per-param":
            for p in self.params:
                if unused is not None and unused.grad_of(p, p) is None:
                    continue  # no gradient on any rank: .grad untouched, as under DDP
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad.div_(self.world_size)
            return
        if self.mode in ("overlap", "hierarchical") and self.kind == "comm":
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

    @staticmethod
    @torch.no_grad()
    def _broadcast(flats):
        for buffer in flats:
            dist.broadcast(buffer.pack(), src=0)
            if dist.get_rank() != 0:
                buffer.unpack()


# --------------------------------------------------------------------------- --sync hierarchical
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


# --------------------------------------------------------------------------- --sync pipelined
def next_partition(remaining, ready_everywhere):
    """The partition whose exchange starts next (pipelined), from what every rank knows: among those ready on every
    rank, the one the next forward needs first (the highest index: buckets hold the parameters in reverse), else the
    next one backward fills (the lowest index left), which a rank then waits for."""
    ready = remaining & ready_everywhere
    return max(ready) if ready else min(remaining)


@torch.no_grad()
def sgd_step(optimizer, params, lr=None):
    """torch's SGD step (optimizer.step()) for `params` alone, at `lr` (a list: one per group; None: each group's):
    the same update, parameter by parameter, the momentum kept in the optimizer's state (so its state_dict, the
    checkpoints and the yardstick's restore see it); a parameter without .grad is skipped, as optimizer.step() does."""
    ids = {id(p) for p in params}
    for group, lr in zip(optimizer.param_groups, lr if isinstance(lr, list) else [lr] * len(optimizer.param_groups)):
        mine = [p for p in group["params"] if id(p) in ids and p.grad is not None]
        if not mine:
            continue
        momenta = [optimizer.state[p].get("momentum_buffer") for p in mine]
        sgd_update(mine, [p.grad for p in mine], momenta, foreach=group["foreach"],
                   lr=group["lr"] if lr is None else lr, weight_decay=group["weight_decay"], momentum=group["momentum"],
                   dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"])
        if group["momentum"]:
            for p, momentum in zip(mine, momenta):
                optimizer.state[p]["momentum_buffer"] = momentum


class _Job:
    """One step's exchange (pipelined): the partitions this rank's backward has filled, each started exchange's
    (work, wire) and the order they started in, the partitions updated, the step's learning rate (in a loop of its
    own: each group's when backward ended, and the stand-ins' window), its parameters without a gradient (_Unused)."""

    def __init__(self, count, lr):
        self.lr, self.ready, self.events, self.works = lr, [False] * count, [None] * count, [None] * count
        self.order, self.applied, self.unused, self.window = [], set(), None, None


class PipelinedSync(GradSync):
    """--sync pipelined (P3, ByteScheduler): the buckets are partitions of <= --bucket-mb, each all-reduced as backward
    fills it and its parameters updated when its exchange has ended: SGD's update is per parameter, so this is the
    same math as one optimizer.step(). A "comm" step returns with exchanges in flight; the next forward waits, in a
    forward pre-hook of each module, only for the partitions holding that module's parameters, and applies their
    update there (on a GPU the wait holds back the training stream, not the host). flush() ends them all.

    The order: every rank must start the same collectives in the same order, but which partition is ready when is
    each rank's own. So the order is decided only from what every rank knows. Each exchange carries, after the
    gradients, a readiness vector: 1 for every partition this rank's backward had filled when the exchange started,
    summed by the same all-reduce, so when an exchange ends every rank holds the same counts. Exchange n is chosen
    when exchange n - credit has ended (at most `credit` in flight), from the vectors of the exchanges ended by then
    (the same on every rank): next_partition's rule. The first exchange of a step knows nothing yet: partition 0.
    A communication thread decides, starts and ends the exchanges, on a process group of its own, so the training
    thread's collectives (buffers, the loss sums, validation) never interleave with them.

    fp16 (a GradScaler): the scaler's one inf check needs every gradient, so the next forward's first module waits
    for every partition, then scaler.step(optimizer) and scaler.update() run as in the other modes: with fp16 the
    exchange hides behind backward and the step boundary, not behind the next forward.

    In a loop of its own (docs/own_loop.md) the sync owns the update: the loop calls no optimizer.step() (at the
    optimizer's lr), and sync.flush() after its last step. Between backward and the next forward the buckets are
    still on the wire, so .grad points at stand-ins (one more copy of the gradients' memory, made once): what the
    loop does to them tells the update's end what to leave in .grad (nothing: the average, which the next backward
    accumulates on; zeroed in place: zeros; set to None: None). no_sync() works as in the other modes: its
    backwards start by taking in the update still due. With find_unused_parameters, a partition whose modules did
    not run in the next forward is updated when the next backward starts (or by flush).
    """
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
        threading.Thread(target=self._serve, daemon=True).start()

    def _tail(self, count, params):
        return count  # the readiness vector

    def begin(self, kind, clock=None, lr=None):
        self.clock = clock or measure.NoClock()
        if kind != "comm":
            self.flush()  # "local" and "blocking" start with nothing in flight
        super().begin(kind)
        if kind == "comm":
            self.pending, self.job = self.job, _Job(len(self.buckets), lr)
            self.last_order = self.job.order
            self.jobs.put(self.job)

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
            self.job = _Job(len(self.buckets), None)
            self.last_order = self.job.order
            self.jobs.put(self.job)

    def zero_grad(self):
        self._take_in()
        if self.kind == "comm":
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
        if self.kind != "comm":
            return super()._finish()
        self.job.unused = self._end_backward()  # the exchanges run on into the next forward
        if not self.driven:  # the learning rates of this step, whatever a scheduler does before the update
            self.job.lr = [group["lr"] for group in self.optimizer.param_groups]
            self.pending, self.job = self.job, None
            self._open_window(self.pending)

    def _open_window(self, job):
        """.grad points at stand-ins until the update (see the class docstring); _settle reads them."""
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
        if self.pending is not None and self.kind == "comm":
            self._apply(self.pending, needs)
            if len(self.pending.applied) == len(self.buckets):
                self.pending = None

    def _apply(self, job, parts):
        """Waits for the exchanges of `parts` and updates their parameters (each partition once)."""
        parts = [b for b in parts if b not in job.applied]
        if not parts:
            return
        self.clock.mark("compute")
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
        self.clock.mark("comm")
        params = [p for b in parts for p in self.buckets[b].tensors]
        left = self._step_grads(job, params)
        with torch.autocast(self.device.type, enabled=False):
            if self.scaler.is_enabled():  # every partition is here: one inf check, one step
                groups = self.optimizer.param_groups
                now = [group["lr"] for group in groups]
                for group, lr in zip(groups, job.lr if isinstance(job.lr, list) else [job.lr] * len(groups)):
                    group["lr"] = lr
                self.scaler.step(self.optimizer)
                self.scaler.update()
                for group, lr in zip(groups, now if isinstance(job.lr, list) else ()):
                    group["lr"] = lr  # a loop of its own: its scheduler's learning rate for the next step
            else:
                sgd_step(self.optimizer, params, job.lr)
        if left is not None:
            self._settle(job, params, left)
        job.applied.update(parts)
        self.clock.mark("update")

    def _full(self, i):  # in the gradient hook (autograd's thread)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()  # the communication thread's stream waits for it
        with self.changed:
            self.job.events[i], self.job.ready[i] = event, True
            self.changed.notify_all()

    # the communication thread
    def _serve(self):
        with common.comm_stream(self.device):
            while True:
                job = self.jobs.get()
                try:
                    self._exchange(job)
                except BaseException as e:  # noqa: BLE001 - raised again by the training thread's wait
                    with self.changed:
                        self.error = e
                        self.changed.notify_all()
                    return

    def _exchange(self, job):
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


# --------------------------------------------------------------------------- training
def make_train_step(model, sync, optimizer, scaler, args, ctx):
    """One training step with our gradient synchronization; kind "local": the same step with no communication at
    all (the yardstick's no-communication step); "blocking": the overlapped modes' buckets synchronized after
    backward. A --sync pipelined "comm" step returns with its exchange in flight: the next forward or flush ends it."""
    criterion = nn.CrossEntropyLoss()

    def train_step(images, targets, clock, lr, kind="comm"):
        sync.begin(kind, clock, lr)
        if kind != "local":
            sync.broadcast_buffers()
            clock.mark("buffers")
        with common.autocast(args, ctx):
            logits = model(images)  # pipelined: each module first waits for, and applies, its partitions' update
            loss = criterion(logits, targets)
        sync.zero_grad()
        scaler.scale(loss).backward()  # overlapped modes: buckets start all-reducing from gradient hooks inside
        clock.mark("compute")
        if kind != "local":
            sync.finish()  # averages the scaled gradients; scaler.step unscales them, as under DDP
            clock.mark("comm")
        if kind == "comm" and sync.pipelined:
            return loss, logits
        common.set_lr(optimizer, lr)
        scaler.step(optimizer)
        scaler.update()
        clock.mark("update")
        return loss, logits

    return train_step


def make_sync(model, args, ctx, optimizer, scaler):
    """The GradSync of --sync on `model`."""
    if args.sync == "pipelined":
        return PipelinedSync(model, optimizer, scaler, args.bucket_mb, args.compress)
    if args.sync == "hierarchical":
        if ctx.rank % ctx.local_world_size != ctx.local_rank:
            raise common.UserError(f"--sync hierarchical needs ranks numbered node by node, as torchrun does (rank "
                                   f"{ctx.rank} is local rank {ctx.local_rank} of {ctx.local_world_size}); use "
                                   "--sync overlap")
        return HierarchicalSync(model, args.bucket_mb, args.compress, ctx.local_world_size)
    return GradSync(model, args.sync, args.bucket_mb, args.compress)


def describe(sync, args):
    """The variant in words, for the start-up line."""
    size = f"<= {args.bucket_mb:g} MiB"
    text = f"--sync {args.sync}, {len(sync.params)} gradient tensors in " + (
        f"{len(sync.buckets)} buckets of {size}" if sync.buckets else "one all-reduce each")
    if args.sync == "pipelined":
        text = (f"--sync pipelined, {len(sync.params)} gradient tensors in {len(sync.buckets)} partitions of {size}, "
                f"each updated as its exchange ends, the next forward waiting per module; order agreed through a "
                f"readiness vector in every exchange, {sync.credit} in flight" +
                ("; fp16 GradScaler: the update waits for the last partition (one inf check)"
                 if sync.scaler.is_enabled() else ""))
    if args.sync == "hierarchical":
        text += (f"; {sync.nodes} node(s) x {sync.local_size} process(es): " + (
            "reduce-scatter in the node, all-reduce of each shard across nodes, all-gather in the node"
            if sync.levels == 2 else "one level, so this is --sync overlap (two levels need 2+ nodes of 2+ "
                                     "processes)"))
    return f"{text}, compress {args.compress}"


def make_method(args, ctx, info, model, weights=None):
    """Our synchronization on `model`, its optimizer and step, as the driver runs them."""
    # Same seed on every rank gives the same initial weights; GradSync also broadcasts rank 0's, as DDP does.
    optimizer = common.make_optimizer(args, model.parameters())
    scaler = common.make_scaler(args, ctx)
    sync = make_sync(model, args, ctx, optimizer, scaler)
    grad_bytes = sum(p.numel() * p.element_size() for p in sync.params)
    layout = {"nodes": sync.nodes, "procs_per_node": sync.local_size, "levels": sync.levels} \
        if args.sync == "hierarchical" else None
    return driver.Method(
        kind="all_reduce", description=describe(sync, args),
        settings=dict(sync=args.sync, bucket_mb=args.bucket_mb, compress=args.compress), model=model,
        step=make_train_step(model, sync, optimizer, scaler, args, ctx),
        state={"model": model, "optimizer": optimizer, "scaler": scaler}, trainers=list(range(ctx.world_size)),
        overlaps=args.sync in ("overlap", "pipelined", "hierarchical"),
        run_length=2 if sync.pipelined else 1,  # a pipelined step waits in its forward for the one before
        flush=sync.flush if sync.pipelined else None,
        end_of_epoch=sync.flush if sync.pipelined else None,  # the last step ends inside the clock
        figures=lambda record, _: {"avg_comm_time": record["phase_times"]["comm"]},  # the waits for the exchange
        fields=dict(weights=weights, num_buckets=len(sync.buckets), gradient_bytes=grad_bytes,
                    wire_bytes_per_step=grad_bytes if sync.wire_dtype is None else grad_bytes // 2,
                    **({"layout": layout} if layout else {})))


def main(argv=None):
    args = parse_args(argv)
    with driver.session(args) as ctx:
        ds = data.open_data(args, ctx, ctx.world_size)
        model, weights = common.build_model(args, ctx, ds.info.num_classes)
        driver.train(args, ctx, ds, make_method(args, ctx, ds.info, model, weights))


if __name__ == "__main__":
    common.run_main(main)
