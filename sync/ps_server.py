"""The guide's parameter server, one step: serve the parameters, gather the workers' gradients, average them,
update; and the single server's figures, shared with the trainers."""
import dataclasses

import torch

import common
import measure


def server_step(comm, optimizer, scaler, lr):
    """The single server's step: serve the parameters, gather the workers' gradients, average them, update (each
    a phase of the server's step, on the clock `comm` holds)."""
    serve(comm, scaler)
    gather(comm)
    server_update(comm, optimizer, scaler, lr)


@measure.phase("serve")
def serve(comm, scaler):
    """The server: puts the loss scale (1 without fp16) into the served state, then serves a pull."""
    comm.layout.scale.copy_(scaler.scale(torch.ones((), device=comm.layout.scale.device)))
    comm.pull()
    comm.finish_pull()


@measure.phase("push_wait")
def gather(comm):
    """The server: receives the workers' pushes (its wait includes their forward and backward)."""
    comm.push()


@measure.phase("update")
def server_update(comm, optimizer, scaler, lr):
    """The server: averages the pushes of every trainer and updates."""
    update(comm, optimizer, scaler, lr, len(comm.trainers))


def update(comm, optimizer, scaler, lr, trainers):
    """An owner: averages the sums pushed to it and steps its optimizer (fp16: unscales once, skips on inf)."""
    comm.layout.average(comm.rank, trainers)
    common.set_lr(optimizer, lr)
    scaler.step(optimizer)
    scaler.update()


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
