"""Local SGD (Lin et al., "Don't Use Large Mini-Batches, Use Local SGD"; torch's post-local-SGD): each rank steps
its own optimizer on its own gradients, and every H steps the parameters and buffers are averaged over the ranks.

H = 1 is synchronous SGD: torch's SGD update (momentum, weight decay, dampening, Nesterov) is linear in the
gradient, so averaging the updated parameters of identical replicas is the update on the averaged gradient, each
rank's momentum buffer staying its own and their mean being DDP's. What differs from DDP at H = 1: BatchNorm's
running statistics are averaged (DDP takes rank 0's), and an optimizer that is not linear in the gradient (Adam)
would not match. For H > 1 the replicas drift apart between averages; communication is 1/H of the model per step.

torch.distributed.algorithms.model_averaging.averagers.PeriodicModelAverager does the same averaging of
parameters, but not of buffers, and its step counter is not in any state_dict (a resumed run would average at other
steps): this class keeps its counter in state_dict() and averages the buffers too.
"""
import contextlib

import torch
import torch.distributed as dist

import common
import measure


class LocalSGD:
    """The sync of `all_reduce_train.py --sync local`: no gradient exchange; average_parameters() after each
    optimizer step averages every `local_steps`-th time. The kit's loop calls begin / broadcast_buffers /
    zero_grad / no_sync / finish as for GradSync; they exchange nothing here."""
    pipelined = False
    averages_parameters = True
    buckets, wire_dtype = (), None

    def __init__(self, model, local_steps):
        self.model, self.local_steps, self.steps = model, local_steps, 0
        self.world_size = dist.get_world_size()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.flats = common.flat_by_dtype([*model.parameters(), *model.buffers()])
        for flat in self.flats:  # the same start everywhere, as DDP does: rank 0's parameters and buffers
            dist.broadcast(flat.pack(), src=0)
            flat.unpack()
        self.model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])

    def begin(self, clock=None, lr=None, *, communicate=True, overlap=True):
        pass  # nothing to set up: the exchange is the average after the update (average_parameters)

    def broadcast_buffers(self):
        pass  # each rank keeps its own buffers between averages

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def no_sync(self):
        return contextlib.nullcontext()  # gradients are never exchanged

    def finish(self):
        pass

    @torch.no_grad()
    def average_parameters(self):
        """After an optimizer step: every `local_steps`-th call, parameters and buffers become their mean over the
        ranks (integer buffers, identical everywhere, stay as they are)."""
        self.steps += 1
        if self.steps % self.local_steps == 0:
            self.average_now()

    def average_now(self, clock=None):
        """The average, whatever the count: at the end of an epoch, so that every rank validates one model (inside
        `clock` when given, its "comm")."""
        self.clock = clock
        self._average()

    @measure.phase("comm")
    @torch.no_grad()
    def _average(self):
        """Parameters and buffers become their mean over the ranks."""
        for flat in self.flats:
            tensor = flat.pack()
            dist.all_reduce(tensor)
            if tensor.is_floating_point():
                tensor.div_(self.world_size)
            else:
                tensor.div_(self.world_size, rounding_mode="floor")
            flat.unpack()

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]
