"""Baseline: PyTorch DistributedDataParallel.

    torchrun --nproc_per_node=4 baseline_multi_card.py

Sync strategy: DDP all-reduces gradients in --bucket-mb (25 MB) buckets from autograd hooks while backward is
still running, so most communication hides behind compute; it also broadcasts buffers from rank 0 each forward.
--comm-hook registers one of torch's own DDP communication hooks: fp16 or bf16 compression (cast, all-reduce,
cast back) or PowerSGD (low-rank gradients with error feedback, after --powersgd-warmup plain steps).
Writes results_baseline_ddp.json (no hook) or results_baseline_ddp_<hook>.json unless --output is given.
"""
import copy

import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import data
import measure

METHOD = "Baseline DDP (PyTorch)"
COMM_HOOKS = ("none", "fp16", "bf16", "powersgd")  # the first is the default


def parse_args(argv=None):
    p = common.make_parser(__doc__.splitlines()[0])
    p.add_argument("--bucket-mb", type=common.positive(float), default=25.0, help="DDP's bucket_cap_mb (MiB)")
    p.add_argument("--comm-hook", choices=COMM_HOOKS, default=COMM_HOOKS[0],
                   help="torch's DDP communication hook: gradients in fp16 or bf16, or PowerSGD")
    p.add_argument("--powersgd-rank", type=common.positive(int), default=1,
                   help="PowerSGD's matrix_approximation_rank (torch's default)")
    p.add_argument("--powersgd-warmup", type=common.positive(int), default=1000,
                   help="PowerSGD's start_powerSGD_iter: plain all-reduce steps before compressing (torch's "
                        "default; must be > 1)")
    args = common.parse(p, argv, lambda a: common.variant_output("baseline_ddp", a.comm_hook, COMM_HOOKS[0]))
    if args.comm_hook == "powersgd" and args.powersgd_warmup < 2:
        p.error("--powersgd-warmup must be at least 2 (PowerSGD's error feedback needs two plain steps first)")
    return args


class PowerSGDSnapshot:
    """state_dict / load_state_dict for a PowerSGD state (error feedback, memories, step counter), so that the
    yardstick can put it back like the optimizer's."""

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
    """--comm-hook on the DDP model; returns what must be snapshotted with it (a PowerSGD state) and the bytes
    one rank puts on the wire per all-reduce of the gradients (computed from the tensor shapes)."""
    grads = [p for p in model.parameters() if p.requires_grad]
    plain = sum(p.numel() * p.element_size() for p in grads)
    if args.comm_hook in ("fp16", "bf16"):
        model.register_comm_hook(None, getattr(default_hooks, f"{args.comm_hook}_compress_hook"))
        return [], plain // 2
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
        return [PowerSGDSnapshot(state)], wire
    return [], plain


def make_train_step(model, optimizer, scaler, args, ctx):
    """One DDP training step; with communicate=False the same step on the bare module: no all-reduce, no
    buffer broadcast (the yardstick's no-communication step)."""
    criterion = nn.CrossEntropyLoss()

    def train_step(images, targets, clock, lr, communicate=True):
        net = model if communicate else model.module
        with common.autocast(args, ctx):
            logits = net(images)
            loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # DDP's bucketed all-reduce runs inside, overlapped
        clock.mark("compute")
        common.set_lr(optimizer, lr)
        scaler.step(optimizer)
        scaler.update()
        clock.mark("update")
        return loss, logits

    return train_step


def measure_overhead(model, optimizer, scaler, step, args, ctx, info, hook_state=()):
    """The yardstick: DDP's step against the same step on the bare module (no communication at all)."""
    clock, lr = measure.NoClock(), common.lr_at(args, 0)
    kinds = {"comm": lambda x, y: step(x, y, clock, lr), "local": lambda x, y: step(x, y, clock, lr, False)}
    with measure.preserved(model, optimizer, scaler, *hook_state):
        overhead = measure.measure_overhead(ctx, args, kinds, *measure.fixed_batch(args, info, ctx))
    common.log(ctx, f"communication overhead: {1e3 * overhead['overhead']:.1f} ms/step "
                    f"({100 * overhead['overhead_share']:.0f}% of a {1e3 * overhead['step_time']:.1f} ms step; "
                    f"{overhead['pairs']} pairs, min {1e3 * overhead['overhead_min']:.1f}, "
                    f"max {1e3 * overhead['overhead_max']:.1f})")
    return overhead


def main(argv=None):
    args = parse_args(argv)
    common.check_output_path(args.output)
    ctx = common.setup_distributed(args)
    try:
        ds = data.open_data(args, ctx, ctx.world_size)
        info = ds.info
        train_loader = data.train_loader(ds, args, ctx, ctx.world_size, ctx.rank)
        val_loader = data.val_loader(ds, args, ctx, ctx.world_size, ctx.rank)
        model, weights = common.build_model(args, ctx, info.num_classes)
        # Same seed on every rank gives the same initial weights; DDP also broadcasts rank 0's at wrap.
        model = DDP(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None,
                    bucket_cap_mb=args.bucket_mb)
        hook_state, wire_bytes = register_hook(model, args)
        optimizer = common.make_optimizer(args, model.parameters())
        scaler = common.make_scaler(args, ctx)
        step = make_train_step(model, optimizer, scaler, args, ctx)
        results = common.Results(args.output, METHOD, "baseline_ddp", ctx, args, info, writer=ctx.is_main,
                                 trainers=ctx.world_size, weights=weights, bucket_mb=args.bucket_mb,
                                 comm_hook=args.comm_hook, gradient_bytes=sum(
                                     p.numel() * p.element_size() for p in model.parameters()),
                                 wire_bytes_per_step=wire_bytes)
        common.log(ctx, f"{METHOD} (buckets of {args.bucket_mb:g} MiB, comm hook {args.comm_hook}): "
                        f"{ctx.world_size} processes ({ctx.backend}, {common.device_name(ctx.device)}), {args.arch} on {info.name} ({info.train_size} train / {info.val_size} val images, "
                        f"{info.image_size}px), {info.steps} steps/epoch, batch {args.batch_size}/process")
        resumed = common.load_checkpoint(args, ctx, owner=0, writer=0)
        if resumed:
            start, state, saved = resumed
            for part, obj in zip(("model", "optimizer", "scaler", "hook"),
                                 (model.module, optimizer, scaler, *hook_state)):
                obj.load_state_dict(state[part])
            results.resume(saved)
            # One step that leaves no trace, after which DDP rebuilds its buckets in the order gradients arrive,
            # as it did early in the interrupted run: the same bucket layout, so the same rounding.
            with measure.preserved(model, optimizer, scaler, *hook_state):
                step(*measure.fixed_batch(args, info, ctx), measure.NoClock(), args.lr)
            common.log(ctx, f"resumed after epoch {start} from {common.checkpoint_dir(args)}")
        elif args.overhead_pairs:
            results.update(comm_overhead=measure_overhead(model, optimizer, scaler, step, args, ctx, info, hook_state))
        for epoch in range(1 + (resumed[0] if resumed else 0), args.epochs + 1):
            link = measure.read_link_bytes(ctx)
            record = measure.run_epoch(ctx, args, epoch, train_loader, info.steps, step)
            record["link"] = measure.busiest_link(ctx, link, record["steps"])
            record["val_loss"], record["val_accuracy"] = measure.evaluate(model.module, val_loader, ctx, args)
            results.add_epoch(record)
            common.checkpoint_epoch(args, ctx, epoch, results, state=None if ctx.rank else {
                "model": model.module.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                **({"hook": hook_state[0].state_dict()} if hook_state else {})})
            common.log(ctx, common.epoch_line(record))
            common.warn_if_data_bound(ctx, record)
        results.finish()
        common.log(ctx, f"wrote {args.output}")
        common.cleanup_distributed(barrier=True)
    finally:
        common.cleanup_distributed()


if __name__ == "__main__":
    common.run_main(main)
