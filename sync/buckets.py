"""What both hand-written methods share: DDP's gradient-view rule, torch's SGD step for some parameters alone, and
the two pipelined engines' machinery (a communication thread's loop, the CUDA event one stream leaves another)."""
import torch

import common
from torch.optim.sgd import sgd as sgd_update


def adopt_grad(param, view):
    """DDP's reducer rule: a gradient that is not its bucket view any more (optimizer.zero_grad() set it to None, so
    backward made a fresh one; or a loop assigned its own) is copied into the view, which becomes .grad again. While
    the views stay, nothing is copied."""
    if param.grad is not view:
        view.copy_(param.grad)
        param.grad = view


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


def record_event(device):
    """A CUDA event recorded now on the current stream (None on a CPU): another stream can wait for it."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def run_jobs(engine, jobs, work, stream=None):
    """A communication thread: `work(job)` for each job from the queue `jobs`, on `stream` (or a new one; nothing on a
    CPU); the first error goes to engine.error under engine.changed, where the training thread's wait raises it."""
    with common.comm_stream(engine.device, stream):
        while True:
            job = jobs.get()
            try:
                work(job)
            except BaseException as e:  # noqa: BLE001 - raised again by the training thread's wait
                with engine.changed:
                    engine.error = e
                    engine.changed.notify_all()
                return
