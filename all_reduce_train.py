"""Manual All-Reduce: our own gradient synchronization on a plain (non-DDP) model.

    torchrun --nproc_per_node=4 all_reduce_train.py --epochs 3 --batch-size 64 --workers 16 --data-dir ./ --backend nccl

Sync strategy: every rank all-reduces its gradients and divides by the world size (one call per tensor,
flat buckets after backward, flat buckets launched from gradient hooks during backward as DDP does, or a
hand-written ring of point-to-point sends), and broadcasts rank 0's buffers before each forward, as DDP does.
"""
import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn

import common

METHOD = "Manual All-Reduce"
SYNC_MODES = ("per-param", "bucketed", "overlap", "ring")
COMM_DEFINITION = ("avg_comm_time: seconds per step that training waits on gradient communication (the time "
                   "from the end of backward until every gradient is averaged; for overlap only the part not "
                   "hidden behind backward). avg_comm_op_time: seconds per step during which a gradient "
                   "all-reduce was in flight (overlap on CPU: union of the buckets' launch-to-completion "
                   "intervals; blocking modes: the same as avg_comm_time; absent where not measurable).")


def default_output(sync):
    """results_all_reduce.json for the default --sync, results_all_reduce_<mode>.json for the others."""
    return "results_all_reduce.json" if sync == "overlap" else f"results_all_reduce_{sync.replace('-', '_')}.json"


def parse_args(argv=None):
    p = common.make_parser(__doc__.splitlines()[0], None)
    p.add_argument("--sync", choices=SYNC_MODES, default="overlap",
                   help="per-param: one all-reduce per gradient after backward; bucketed: one per flat bucket "
                        "after backward; overlap: buckets all-reduced asynchronously from gradient hooks during "
                        "backward; ring: our own reduce-scatter + all-gather with isend/irecv over flat buckets")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="gradient bucket size in MiB (not per-param)")
    output = next(a for a in p._actions if a.dest == "output")
    output.default = argparse.SUPPRESS  # left unset when not given, so it can follow --sync
    output.help = f"results JSON path (default: {default_output('overlap')}, or {default_output('<mode>')} " \
                  "for another --sync)"
    args = p.parse_args(argv)
    if not args.bucket_mb > 0:
        p.error(f"argument --bucket-mb: must be positive, got {args.bucket_mb}")
    if "output" not in vars(args):
        args.output = default_output(args.sync)
    return args


# --------------------------------------------------------------------------- communication primitives
@torch.no_grad()
def broadcast_coalesced(tensors, src=0):
    """Copies rank `src`'s tensors to every rank: one flat buffer and one broadcast per dtype."""
    by_dtype = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.broadcast(flat, src)
        if dist.get_rank() != src:
            for t, part in zip(same, flat.split([t.numel() for t in same])):
                t.copy_(part.view(t.shape))


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
def make_buckets(params, bucket_bytes):
    """Parameters in reverse order (the order backward produces their gradients), cut into buckets of one
    dtype and at most `bucket_bytes` each; a tensor larger than that gets a bucket of its own."""
    buckets, size = [], 0
    for p in reversed(params):
        nbytes = p.numel() * p.element_size()
        if not buckets or size + nbytes > bucket_bytes or p.dtype != buckets[-1][0].dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += nbytes
    return buckets


class Bucket:
    """A flat buffer holding the gradients of some parameters; each parameter's .grad becomes a view of it."""

    def __init__(self, params):
        self.params = params
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        self.views = [v.view(p.shape) for p, v in zip(params, self.flat.split([p.numel() for p in params]))]
        self.ready = 0  # gradients accumulated in this backward (overlap)

    @torch.no_grad()
    def pack(self, world_size):
        # Divided before summing, as DDP does, in the same pass that fills the buffer. The .grad left
        # pointing into the buffer receives the sum in place, so nothing is copied back; a grad that is
        # already that view (zero_grad(set_to_none=False)) only needs the division; a missing one is zeros.
        for p, view in zip(self.params, self.views):
            if p.grad is None:
                view.zero_()
            elif p.grad.data_ptr() == view.data_ptr():
                view.div_(world_size)
            else:
                torch.div(p.grad, world_size, out=view)
            p.grad = view


class GradSync:
    """Averages a plain model's gradients over all ranks with one of SYNC_MODES, and keeps its parameters
    and buffers identical on all ranks the way DDP does (rank 0's copied at start, buffers every forward)."""

    def __init__(self, model, mode, bucket_mb=25.0):
        self.mode, self.world_size = mode, dist.get_world_size()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buffers = list(model.buffers())
        self.buckets = [] if mode == "per-param" else \
            [Bucket(ps) for ps in make_buckets(self.params, int(bucket_mb * 2 ** 20))]
        # Completion callbacks time a collective only on CPU: a NCCL future completes when the work is queued.
        self.timed = mode == "overlap" and self.params[0].device.type == "cpu"
        self.op_times, self.spans, self.works, self.launched = [], [], [], 0
        if mode == "overlap":
            self.bucket_of = {id(p): b for b in self.buckets for p in b.params}
            for p in self.params:
                p.register_post_accumulate_grad_hook(self._grad_ready)
        broadcast_coalesced(self.params + self.buffers)  # seeded alike already; this makes it a guarantee

    def broadcast_buffers(self):
        """DDP's rule: every forward starts from rank 0's buffers (BatchNorm running statistics)."""
        if self.buffers:
            broadcast_coalesced(self.buffers)

    def _grad_ready(self, param):
        self.bucket_of[id(param)].ready += 1
        # Launch strictly in bucket order, so every rank issues the same collectives in the same order.
        while self.launched < len(self.buckets) and \
                self.buckets[self.launched].ready == len(self.buckets[self.launched].params):
            self._launch(self.buckets[self.launched])

    def _launch(self, bucket):
        bucket.pack(self.world_size)
        start = time.perf_counter()
        work = dist.all_reduce(bucket.flat, async_op=True)
        if self.timed:
            def done(fut):
                self.spans.append((start, time.perf_counter()))
                return fut.value()  # re-raises a failed all-reduce in wait()
            work = work.get_future().then(done)
        self.works.append(work)
        self.launched += 1

    def finish(self):
        """Call after backward: leaves every parameter's .grad holding the average over all ranks."""
        if self.mode == "per-param":
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad.div_(self.world_size)
        elif self.mode in ("bucketed", "ring"):
            for bucket in self.buckets:
                bucket.pack(self.world_size)
                if self.mode == "ring":
                    ring_all_reduce(bucket.flat)
                else:
                    dist.all_reduce(bucket.flat)
        else:
            while self.launched < len(self.buckets):  # buckets holding a parameter that got no gradient
                self._launch(self.buckets[self.launched])
            for work in self.works:
                work.wait()
            for bucket in self.buckets:
                bucket.ready = 0
            self.works, self.launched = [], 0
            if self.timed:
                self.op_times.append(busy_time(self.spans))
                self.spans = []


def busy_time(spans):
    """Length of the union of (start, end) intervals: time with at least one operation in flight."""
    total, reached = 0.0, float("-inf")
    for start, end in sorted(spans):
        total += max(0.0, end - max(start, reached))
        reached = max(reached, end)
    return total


# --------------------------------------------------------------------------- training
def train_one_epoch(model, sync, optimizer, scaler, criterion, loader, steps, epoch, ctx, args):
    """One epoch of training with our gradient synchronization; returns the epoch's metrics."""

    def train_step(images, targets, clock):
        sync.broadcast_buffers()
        with common.autocast(args, ctx):
            logits = model(images)
            loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # overlap: buckets start all-reducing from gradient hooks inside
        clock.mark("compute")
        sync.finish()  # averages the scaled gradients; scaler.step unscales them, as under DDP
        clock.mark("comm")
        scaler.step(optimizer)
        scaler.update()
        clock.mark("update")
        return loss, logits

    sync.op_times.clear()
    record = common.run_epoch(ctx, args, epoch, loader, steps, train_step)
    record["avg_comm_time"] = record["phase_times"]["comm"]
    op_times = sync.op_times[record["warmup_steps"]:]
    if op_times:
        record["avg_comm_op_time"] = statistics.mean(op_times)
    elif sync.mode != "overlap":  # blocking: the operations are all the waiting
        record["avg_comm_op_time"] = record["avg_comm_time"]
    return record


def main(argv=None):
    args = parse_args(argv)
    common.check_output_path(args.output)
    ctx = common.setup_distributed(args)
    try:
        train_loader, val_loader, info, steps = common.build_data(args, ctx, ctx.world_size, ctx.rank)
        model, weights = common.build_model(args, ctx, info.num_classes)
        # Same seed on every rank gives the same initial weights; GradSync also broadcasts rank 0's, as DDP does.
        sync = GradSync(model, args.sync, args.bucket_mb)
        criterion = nn.CrossEntropyLoss()
        optimizer = common.make_optimizer(args, model.parameters())
        scaler = common.make_scaler(args, ctx)
        results = common.Results(args.output, METHOD, ctx, args, info, ctx.is_main, kind="all_reduce",
                                 sync=args.sync, bucket_mb=args.bucket_mb, num_buckets=len(sync.buckets),
                                 comm_time_definition=COMM_DEFINITION, weights=weights,
                                 steps_per_epoch=steps)
        layout = (f" in {len(sync.buckets)} buckets of <= {args.bucket_mb:g} MiB" if sync.buckets
                  else ", one all-reduce each")
        layout = f"{len(sync.params)} gradient tensors{layout}"
        common.print0(ctx, f"{METHOD} (--sync {args.sync}, {layout}): {ctx.world_size} processes ({ctx.backend}, "
                           f"{common.device_name(ctx.device)}), {args.arch} on {info.name} ({info.train_size} train / "
                           f"{info.val_size} val images, {info.image_size}px), {steps} steps/epoch, "
                           f"batch {args.batch_size}/process")
        for epoch in range(1, args.epochs + 1):
            record = train_one_epoch(model, sync, optimizer, scaler, criterion, train_loader, steps, epoch, ctx, args)
            record["val_loss"], record["val_accuracy"] = common.evaluate(model, val_loader, ctx, args)
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
