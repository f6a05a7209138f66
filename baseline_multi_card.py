"""Baseline: PyTorch DistributedDataParallel.

    torchrun --nproc_per_node=4 baseline_multi_card.py

Sync strategy: DDP all-reduces gradients in --bucket-mb (25 MB) buckets from autograd hooks while backward is
still running, so most communication hides behind compute; it also broadcasts buffers from rank 0 each forward.
--comm-hook registers one of torch's own DDP communication hooks: fp16 or bf16 compression (cast, all-reduce,
cast back) or PowerSGD (low-rank gradients with error feedback, after --powersgd-warmup plain steps).
Writes results_baseline_ddp.json (no hook) or results_baseline_ddp_<hook>.json unless --output is given.
"""
import contextlib
import copy

import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import data
import driver
import measure
from modes import COMM_HOOKS, DEFAULT_BUCKET_MB, variant_output


def parse_args(argv=None):
    p = common.make_parser(__doc__, lambda a: variant_output("baseline_ddp", a.comm_hook, COMM_HOOKS[0]))
    p.add_argument("--bucket-mb", type=common.positive(float), default=DEFAULT_BUCKET_MB,
                   help="DDP's bucket_cap_mb (MiB)")
    p.add_argument("--comm-hook", choices=COMM_HOOKS, default=COMM_HOOKS[0],
                   help="torch's DDP communication hook: gradients in fp16 or bf16, or PowerSGD")
    p.add_argument("--powersgd-rank", type=common.positive(int), default=1,
                   help="PowerSGD's matrix_approximation_rank (torch's default)")
    p.add_argument("--powersgd-warmup", type=common.positive(int), default=1000,
                   help="PowerSGD's start_powerSGD_iter: plain all-reduce steps before compressing (torch's "
                        "default; must be > 1)")
    args = common.parse(p, argv)
    if args.comm_hook == "powersgd" and args.powersgd_warmup < 2:
        p.error("--powersgd-warmup must be at least 2 (PowerSGD's error feedback needs two plain steps first)")
    return args


class PowerSGDSnapshot:
    """state_dict / load_state_dict for a PowerSGD state (error feedback, memories, step counter), so that the
    yardstick and the checkpoints can put it back like the optimizer's."""

    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return {slot: copy.deepcopy(getattr(self.state, slot)) for slot in self.state.__slots__
                if slot != "process_group"}

    def load_state_dict(self, saved):
        for slot, value in saved.items():
            setattr(self.state, slot, copy.deepcopy(value))


def one_bucket_at_a_time(hook):
    """A hook that starts each bucket's exchange only after the previous bucket's has finished. PowerSGD issues
    its second all-reduce (Q) from a callback of its first (P); gloo runs such callbacks on its own threads as the
    first completes, so with two buckets in flight the ranks can issue [Q of bucket 1, P of bucket 2] in different
    orders: a collective mismatch (seen on the emulated 1 Gbit/s cluster). NCCL issues them in stream order."""
    last = []

    def ordered(state, bucket):
        if last:
            last.pop().wait()
        last.append(hook(state, bucket))
        return last[0]
    return ordered


def register_hook(model, args):
    """--comm-hook on the DDP model; returns what must be snapshotted with it ({"hook": PowerSGD's state}) and the
    bytes one rank puts on the wire per all-reduce of the gradients (computed from the tensor shapes)."""
    grads = [p for p in model.parameters() if p.requires_grad]
    plain = sum(p.numel() * p.element_size() for p in grads)
    if args.comm_hook in ("fp16", "bf16"):
        model.register_comm_hook(None, getattr(default_hooks, f"{args.comm_hook}_compress_hook"))
        return {}, plain // 2
    if args.comm_hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(None, matrix_approximation_rank=args.powersgd_rank,
                                            start_powerSGD_iter=args.powersgd_warmup)
        hook = powerSGD_hook.powerSGD_hook
        model.register_comm_hook(state, one_bucket_at_a_time(hook) if dist.get_backend() == "gloo" else hook)
        wire = 0
        for p in grads:  # rank-r factors P (n x r) and Q (m x r) where that compresses, else the tensor itself
            n, m = p.shape[0], p.numel() // p.shape[0]
            r = min(args.powersgd_rank, n, m)
            wire += 4 * ((n + m) * r if p.dim() > 1 and (n + m) * r * 2 <= n * m else p.numel())
        return {"hook": PowerSGDSnapshot(state)}, wire
    return {}, plain


def make_train_step(model, optimizer, scaler, args, ctx):
    """One DDP training step; kind "local": the same step on the bare module, so no all-reduce and no buffer
    broadcast (the yardstick's no-communication step). Phases: "compute" ends with this rank's last gradient (a
    hook), "sync" is backward's wait for DDP's all-reduce after it (where a rank waits for a slower one)."""
    criterion = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    pending = {"clock": None, "left": 0}

    def own_compute_done(_):
        pending["left"] -= 1
        if pending["left"] == 0:
            pending["clock"].mark("compute")

    for p in params:
        p.register_post_accumulate_grad_hook(own_compute_done)

    def train_step(images, targets, clock, lr, kind="comm"):
        net = model if kind == "comm" else model.module
        micro, losses, outputs = common.micro_batches(images, targets), [], []
        optimizer.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(micro):
            last = i + 1 == len(micro)
            pending.update(clock=clock if last else measure.NoClock(), left=len(params))
            # --accumulate K: nanoGPT's pattern, DDP's all-reduce only in the last micro-batch's backward
            with model.no_sync() if not last and kind == "comm" else contextlib.nullcontext():
                with common.autocast(args, ctx):
                    logits = net(x)
                    loss = criterion(logits, y)
                scaler.scale(loss / len(micro) if len(micro) > 1 else loss).backward()  # DDP's all-reduce inside
            losses.append(loss)
            outputs.append(logits)
        loss, logits = (loss, logits) if len(micro) == 1 else common.accumulated(losses, outputs)
        if pending["left"]:  # a parameter without a gradient: no hook said when compute ended
            clock.mark("compute")
        clock.mark("sync")
        common.set_lr(optimizer, lr)
        scaler.step(optimizer)
        scaler.update()
        clock.mark("update")
        return loss, logits

    return train_step


def make_method(args, ctx, info, model, weights=None):
    """DDP around `model`, its hook, optimizer and step, as the driver runs them; and the DDP wrapper."""
    # Same seed on every rank gives the same initial weights; DDP also broadcasts rank 0's at wrap.
    ddp = DDP(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None, bucket_cap_mb=args.bucket_mb)
    hook_state, wire_bytes = register_hook(ddp, args)
    optimizer = common.make_optimizer(args, ddp.parameters())
    scaler = common.make_scaler(args, ctx)
    return driver.Method(
        kind="baseline_ddp", description=f"buckets of {args.bucket_mb:g} MiB, comm hook {args.comm_hook}",
        settings=dict(comm_hook=args.comm_hook, bucket_mb=args.bucket_mb), model=model,
        step=make_train_step(ddp, optimizer, scaler, args, ctx),
        state={"model": model, "optimizer": optimizer, "scaler": scaler, **hook_state},
        trainers=list(range(ctx.world_size)),
        figures=lambda record, _: {"ddp_logging": ddp_logging(ddp)},
        fields=dict(weights=weights, gradient_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
                    wire_bytes_per_step=wire_bytes)), ddp


def ddp_logging(ddp):
    """DDP's own timers (its logging data, seconds): averages over the iterations it samples (the first ten and
    every hundredth) since the run began: backward's communication time (from a bucket's all-reduce launch to
    its end, summed), how much of it overlapped backward compute, backward and forward compute. None when DDP
    exposes none."""
    try:
        logged = ddp._get_ddp_logging_data()
    except (AttributeError, RuntimeError):
        return None
    keys = ("avg_backward_comm_time", "avg_backward_compute_comm_overlap_time", "avg_backward_compute_time",
            "avg_forward_compute_time")
    if not all(isinstance(logged.get(k), int) for k in keys):
        return None
    return {**{k: logged[k] / 1e9 for k in keys}, "sampled_iterations_up_to": logged.get("iteration")}


def train(run, train_step):
    """The training loop: DDP's step on each batch (driver.Run keeps the rest: resume or yardstick, validation,
    checkpoints, results; driver.Epoch the clock, the sums, the learning rate)."""
    for epoch in run.epochs():
        steps = run.steps()  # this epoch's batches on this rank's shard, its clock and learning rate
        for images, targets in steps:
            loss, logits = train_step(images, targets, steps.clock, steps.lr)  # DDP all-reduces inside backward
            steps.count(loss, logits, targets)  # the loss and accuracy sums, --log-every, --checkpoint-every
        run.end_epoch(steps.finish())  # validation, link counters, checkpoint, results, the epoch line


def main(argv=None):
    args = parse_args(argv)
    with driver.session(args) as ctx:
        ds = data.open_data(args, ctx, ctx.world_size)
        model, weights = common.build_model(args, ctx, ds.info.num_classes)
        method, _ = make_method(args, ctx, ds.info, model, weights)
        with driver.Run(args, ctx, ds, method) as run:
            if run.ckpt.resumed:  # one step that leaves no trace: DDP then rebuilds its buckets in the order the
                # gradients arrive, as early in the interrupted run (the same bucket layout, so the same rounding)
                driver.step_without_trace(args, ctx, ds.info, method, run.compute)
            train(run, method.step)


if __name__ == "__main__":
    common.run_main(main)
