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
  local         local SGD: no gradient exchange; every rank steps on its own gradients and every --local-steps H
                steps the parameters and buffers are averaged (sync/local_sgd.py): 1/H of the model per step
--accumulate K trains K micro-batches per optimizer step, exchanging once (no_sync() for the first K-1).
--compress fp16|bf16 casts each bucket before the all-reduce and back after, as DDP's compression hooks do.
In a training loop of your own every sync keeps DDP's contract (zero_grad, no_sync, unused parameters, buffers):
docs/own_loop.md.
Writes results_all_reduce.json (--sync overlap) or results_all_reduce_<sync>.json unless --output is given.
"""
import contextlib

import torch.nn as nn

import common
import data
import driver
from modes import DEFAULT_BUCKET_MB, SYNC_MODES, variant_output
from sync.allreduce import OVERLAPPED, WIRE_DTYPES, GradSync, HierarchicalSync
from sync.local_sgd import LocalSGD
from sync.pipelined_allreduce import PipelinedSync


def parse_args(argv=None):
    p = common.make_parser(__doc__, lambda a: variant_output("all_reduce", a.sync, SYNC_MODES[0]))
    p.add_argument("--sync", choices=SYNC_MODES, default=SYNC_MODES[0], help="how gradients are synchronized")
    p.add_argument("--bucket-mb", type=common.positive(float), default=DEFAULT_BUCKET_MB,
                   help="gradient bucket size in MiB (not per-param); pipelined: the partition size")
    p.add_argument("--compress", choices=tuple(WIRE_DTYPES), default="none",
                   help="dtype gradients travel in (bucketed modes), as DDP's fp16/bf16 compression hooks")
    p.add_argument("--local-steps", type=common.positive(int), default=4, metavar="H",
                   help="--sync local: optimizer steps between two averages of the parameters and buffers")
    args = common.parse(p, argv)
    if args.sync == "local" and args.compress != "none":
        p.error("--sync local averages parameters, not gradients, uncompressed (drop --compress)")
    if args.accumulate > 1 and args.sync == "pipelined":
        p.error("--accumulate needs the update after the last micro-batch, which --sync pipelined applies inside "
                "the next forward (use --sync overlap)")
    if args.compress != "none" and args.sync == "per-param":
        p.error("--compress needs buckets (use --sync bucketed, overlap, ring, pipelined or hierarchical)")
    return args


# --------------------------------------------------------------------------- training
def make_train_step(model, sync, optimizer, scaler, args, ctx):
    """One training step with our gradient synchronization; the yardstick's kinds: "local" communicates nothing,
    "blocking" synchronizes after backward. A pipelined "comm" step returns with its exchange in flight."""
    criterion = nn.CrossEntropyLoss()

    def train_step(images, targets, clock, lr, kind="comm"):
        communicate, overlap = kind != "local", kind == "comm"  # the yardstick's kind in the sync's own terms
        sync.begin(clock, lr, communicate=communicate, overlap=overlap)
        if communicate:
            sync.broadcast_buffers()
            clock.mark("buffers")
        micro, losses, outputs = common.micro_batches(images, targets), [], []
        for i, (x, y) in enumerate(micro):  # --accumulate K: K micro-batches, the exchange after the last one only
            with sync.no_sync() if i + 1 < len(micro) else contextlib.nullcontext():
                with common.autocast(args, ctx):
                    logits = model(x)  # pipelined: each module first waits for, and applies, its partitions' update
                    loss = criterion(logits, y)
                if i == 0:
                    sync.zero_grad()
                # overlapped modes: buckets start all-reducing from gradient hooks inside
                scaler.scale(loss / len(micro) if len(micro) > 1 else loss).backward()
            losses.append(loss)
            outputs.append(logits)
        clock.mark("compute")
        if communicate:
            sync.finish()  # averages the scaled gradients; scaler.step unscales them, as under DDP
            clock.mark("comm")
        loss, logits = (loss, logits) if len(micro) == 1 else common.accumulated(losses, outputs)
        if overlap and sync.pipelined:
            return loss, logits
        common.set_lr(optimizer, lr)
        scaler.step(optimizer)
        scaler.update()
        clock.mark("update")
        if communicate and sync.averages_parameters:  # local SGD: every H steps, after the update
            sync.average_parameters()
            clock.mark("comm")
        return loss, logits

    return train_step


def make_sync(model, args, ctx, optimizer, scaler):
    """The GradSync of --sync on `model`."""
    if args.sync == "pipelined":
        return PipelinedSync(model, optimizer, scaler, args.bucket_mb, args.compress)
    if args.sync == "hierarchical":
        return HierarchicalSync(model, args.bucket_mb, args.compress, ctx.local_world_size, ctx.local_rank)
    if args.sync == "local":
        return LocalSGD(model, args.local_steps)
    return GradSync(model, args.sync, args.bucket_mb, args.compress)


def describe(sync, args):
    """The variant in words, for the start-up line."""
    if args.sync == "local":
        return (f"--sync local (local SGD): every rank steps on its own gradients, parameters and buffers averaged "
                f"every {args.local_steps} steps")
    size = f"<= {args.bucket_mb:g} MiB"
    text = f"--sync {args.sync}, {len(sync.params)} gradient tensors in " + (
        "one all-reduce each" if args.sync == "per-param" else f"{len(sync.buckets)} buckets of {size}")
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
    """Our synchronization on `model`, its optimizer and step, as the driver runs them; and what the loop runs
    inside the last step of an epoch (pipelined: the last exchange ends; local SGD: one average), or None."""
    # Same seed on every rank gives the same initial weights; GradSync also broadcasts rank 0's, as DDP does.
    optimizer = common.make_optimizer(args, model.parameters())
    scaler = common.make_scaler(args, ctx)
    sync = make_sync(model, args, ctx, optimizer, scaler)
    grad_bytes = sum(p.numel() * p.element_size() for p in sync.params)
    wire = grad_bytes if sync.wire_dtype is None else grad_bytes // 2
    local = args.sync == "local"
    local_steps = {"local_steps": args.local_steps} if local else {}  # local SGD's H: in the settings and results
    method = driver.Method(
        kind="all_reduce", description=describe(sync, args),
        settings=dict(sync=args.sync, bucket_mb=args.bucket_mb, compress=args.compress, **local_steps), model=model,
        step=make_train_step(model, sync, optimizer, scaler, args, ctx),
        state={"model": model, "optimizer": optimizer, "scaler": scaler, **({"local_sgd": sync} if local else {})},
        trainers=list(range(ctx.world_size)),
        overlaps=args.sync in OVERLAPPED,
        run_length=2 if sync.pipelined else 1,  # a pipelined step waits in its forward for the one before
        flush=sync.flush if sync.pipelined else None,
        replicated=not local,  # local SGD's replicas differ between averages: each rank checkpoints its own
        figures=lambda record, _: {"avg_comm_time": record["phase_times"]["comm"]},  # the waits for the exchange
        fields=dict(weights=weights, num_buckets=len(sync.buckets), gradient_bytes=grad_bytes,
                    wire_bytes_per_step=sync.model_bytes / args.local_steps if local else wire, **local_steps,
                    **({"layout": sync.topology} if args.sync == "hierarchical" else {})))
    # the last step ends inside the clock; local SGD: one model to validate, averaged whatever the count
    return method, sync.flush if sync.pipelined else sync.average_now if local else None


def train(run, train_step, end_of_epoch):
    """The training loop: our synchronized step on each batch (driver.Run keeps the rest: resume or yardstick,
    validation, checkpoints, results; driver.Epoch the clock, the sums, the learning rate)."""
    for epoch in run.epochs():
        steps = run.steps()  # this epoch's batches on this rank's shard, its clock and learning rate
        for images, targets in steps:
            loss, logits = train_step(images, targets, steps.clock, steps.lr)  # forward, backward, sync, update
            steps.count(loss, logits, targets)  # the loss and accuracy sums, --log-every, --checkpoint-every
        if end_of_epoch:  # pipelined: the last exchange ends; local SGD: one average (every rank validates one model)
            end_of_epoch(steps.clock)
        run.end_epoch(steps.finish())  # validation, link counters, checkpoint, results, the epoch line


def main(argv=None):
    args = parse_args(argv)
    with driver.session(args) as ctx:
        ds = data.open_data(args, ctx, ctx.world_size)
        model, weights = common.build_model(args, ctx, ds.info.num_classes)
        method, end_of_epoch = make_method(args, ctx, ds.info, model, weights)
        with driver.Run(args, ctx, ds, method) as run:
            train(run, method.step, end_of_epoch)


if __name__ == "__main__":
    common.run_main(main)
