"""Baseline: PyTorch DistributedDataParallel.

    torchrun --nproc_per_node=4 baseline_multi_card.py

Sync strategy: DDP all-reduces gradients in ~25 MB buckets from autograd hooks while backward is still
running, so most communication hides behind compute; it also broadcasts buffers from rank 0 each forward.
"""
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import common

METHOD = "Baseline DDP (PyTorch)"


def parse_args(argv=None):
    p = common.make_parser(__doc__.splitlines()[0], "results_baseline_ddp.json")
    p.add_argument("--calib-steps", type=int, default=3,
                   help="steps timed with and without gradient sync to measure DDP's exposed "
                        "communication (0: skip)")
    return p.parse_args(argv)


def calibrate_comm(model, ctx, args, batch_shape, num_classes, criterion):
    """DDP's exposed communication per step: median forward+backward time with gradient sync minus the
    same under `no_sync()` (compute only), on a fixed random batch.

    Gradients are zeroed and BatchNorm buffers restored afterwards, so training is unchanged.
    Returns (exposed, with_sync, compute_only) in seconds, averaged over ranks.
    """
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randn(batch_shape, generator=g).to(ctx.device)
    targets = torch.randint(0, num_classes, (batch_shape[0],), generator=g).to(ctx.device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)

    def fwd_bwd():
        with common.autocast(args, ctx):
            loss = criterion(model(images), targets)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def compute_only():
        with model.no_sync():
            fwd_bwd()

    with common.preserved_buffers(model):
        with_sync = common.median_time(fwd_bwd, args.calib_steps, ctx.device)
        alone = common.median_time(compute_only, args.calib_steps, ctx.device)
    times = torch.tensor([with_sync, alone], dtype=torch.float64, device=ctx.device)
    with_sync, alone = (common.all_reduce_sum(times) / ctx.world_size).tolist()
    return max(0.0, with_sync - alone), with_sync, alone


def train_one_epoch(model, optimizer, scaler, criterion, loader, steps, epoch, ctx, args):
    """One epoch of DDP training; returns the epoch's metrics."""

    def train_step(images, targets, clock):
        with common.autocast(args, ctx):
            logits = model(images)
            loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # DDP's bucketed all-reduce runs inside, overlapped
        clock.mark("compute")
        scaler.step(optimizer)
        scaler.update()
        clock.mark("update")
        return loss, logits

    return common.run_epoch(ctx, args, epoch, loader, steps, train_step)


def main(argv=None):
    args = parse_args(argv)
    common.check_output_path(args.output)
    ctx = common.setup_distributed(args)
    try:
        train_loader, val_loader, info, steps = common.build_data(args, ctx, ctx.world_size, ctx.rank)
        model, weights = common.build_model(args, ctx, info.num_classes)
        # Same seed on every rank gives the same initial weights; DDP also broadcasts rank 0's at wrap.
        model = DDP(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
        criterion = nn.CrossEntropyLoss()
        optimizer = common.make_optimizer(args, model.parameters())
        scaler = common.make_scaler(args, ctx)
        results = common.Results(args.output, METHOD, ctx, args, info, ctx.is_main, kind="baseline_ddp",
                                 weights=weights,
                                 steps_per_epoch=steps)
        common.print0(ctx, f"{METHOD}: {ctx.world_size} processes ({ctx.backend}, {common.device_name(ctx.device)}), "
                           f"{args.arch} on {info.name} ({info.train_size} train / {info.val_size} val images, "
                           f"{info.image_size}px), {steps} steps/epoch, batch {args.batch_size}/process")
        calibration = None
        if args.calib_steps > 0:
            exposed, with_sync, alone = calibrate_comm(
                model, ctx, args, (args.batch_size, 3, info.image_size, info.image_size), info.num_classes, criterion)
            calibration = {"exposed_comm_time": exposed, "fwd_bwd_with_sync": with_sync,
                           "fwd_bwd_compute_only": alone, "steps": args.calib_steps,
                           "definition": "median forward+backward time with DDP gradient sync minus the same "
                                         "under no_sync(), same random batch, mean over ranks (seconds)"}
            results.data["comm_calibration"] = calibration
            common.print0(ctx, f"calibration: fwd+bwd {1e3 * with_sync:.1f}ms with sync, {1e3 * alone:.1f}ms "
                               f"compute only -> exposed communication {1e3 * exposed:.1f}ms/step")
        for epoch in range(1, args.epochs + 1):
            record = train_one_epoch(model, optimizer, scaler, criterion, train_loader, steps, epoch, ctx, args)
            record["val_loss"], record["val_accuracy"] = common.evaluate(model.module, val_loader, ctx, args)
            if calibration:
                record["avg_comm_time"] = calibration["exposed_comm_time"]
            results.add_epoch(record)
            common.print0(ctx, common.epoch_line(record))
            common.warn_if_data_bound(ctx, record)
        results.finish()
        common.print0(ctx, f"wrote {args.output}")
        common.cleanup_distributed(barrier=True)
    finally:
        common.cleanup_distributed()


if __name__ == "__main__":
    common.run_main(main)
