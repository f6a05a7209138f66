"""The manual all-reduce's gradient sync with DDP's contract (GradSync): --sync per-param, bucketed, overlap and
ring; the rooms beside it (hierarchical, pipelined_allreduce) extend it."""
import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn

import common
from modes import SYNC_MODES
from sync.buckets import adopt_grad
from sync.ring import ring_all_reduce


WIRE_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def _grad_bucket(params, tail=0):
    """A flat buffer whose views become `params`' gradients, with `tail` more elements after them (pipelined: the
    readiness vector; hierarchical: padding to a multiple of the processes per node); `.grads` is the gradient part."""
    bucket = common.FlatBuffer([*params, params[0].new_zeros(tail)] if tail else params)
    bucket.tail = bucket.views.pop() if tail else None
    del bucket.tensors[len(params):]
    bucket.grads = bucket.flat[:bucket.flat.numel() - tail]
    return bucket




OVERLAPPED = ("overlap", "hierarchical", "pipelined")  # the modes whose buckets start from the gradient hooks
_REGISTRATIONS = [0]  # parameters, buffers and modules registered on any module here (_DdpContract._check_model)


def _registered(module, name, value):
    _REGISTRATIONS[0] += 1  # returns None: the registered value stays


for _hook in ("parameter", "buffer", "module"):
    getattr(nn.modules.module, f"register_module_{_hook}_registration_hook")(_registered)


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


class _DdpContract:
    """GradSync's half that keeps DDP's contract around the exchange (the rules in GradSync's docstring): no_sync(),
    rank 0's buffers before a forward, the model unchanged since construction, the end of backward in a loop of its
    own, the parameters a backward gave no gradient. It reads the state GradSync.__init__ sets."""

    @contextlib.contextmanager
    def no_sync(self):
        """DDP's no_sync(): a backward whose forward ran inside accumulates the gradients locally, with no
        communication; the first backward after it synchronizes the accumulated sum."""
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

    def _backward_starts(self):
        self.syncing = self.sync_backward
        if not self.driven:  # a loop of its own: the sync ends when backward does, as DDP's does
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ends)

    def _backward_ends(self):
        self.in_backward = False
        if self.syncing:
            self._finish()

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
        if missing and self.overlapped:
            for i, bucket in enumerate(self.buckets):
                if self.filled[i] < len(bucket.tensors):
                    self.filled[i] = len(bucket.tensors)
                    self._full(i)
        self.filled = [0] * len(self.buckets)
        # after every bucket has started, so that every rank issues the collectives in one order
        return _Unused(self.params, missing, self.device) if self.find_unused_parameters else None

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
        # a loop of its own never calls begin(): every step communicates, overlapped as the mode says
        self.communicates, self.overlapped = True, mode in OVERLAPPED
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

    def begin(self, clock=None, lr=None, *, communicate=True, overlap=True):
        """A step at learning rate `lr` starts, timed by `clock`: it synchronizes (`communicate`) or not, its buckets
        starting from the gradient hooks in the overlapped modes (`overlap`) or after backward. The kit's loop calls
        it (its train_step turns the yardstick's kind of step into these terms)."""
        self.clock, self.driven = clock, True
        self.communicates, self.overlapped = communicate, communicate and overlap and self.mode in OVERLAPPED

    def zero_grad(self):
        """Zeroes the gradients for the next backward (in place: they stay views of the buckets)."""
        for bucket in self.buckets:
            bucket.grads.zero_()
        for p in self.params if not self.buckets else ():
            p.grad = None

    def _grad_ready(self, param, view):
        """The gradient hook, after backward has accumulated into param.grad (`view`: its bucket view, if any)."""
        if not self.communicates:
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
