"""Manual All-Reduce: our own gradient synchronization on a plain (non-DDP) model.

    torchrun --nproc_per_node=4 all_reduce_train.py --epochs 3 --batch-size 64 --workers 16 --data-dir ./ --backend nccl

Sync strategy: every rank all-reduces its gradients and divides by the world size, and broadcasts rank 0's
buffers before each forward, as DDP does. --sync chooses how:
  per-param  one all-reduce per gradient tensor after backward (the naive version)
  bucketed   gradients live in ~--bucket-mb flat buffers, one blocking all-reduce per bucket after backward
  overlap    (default) the same buckets, each all-reduced asynchronously from gradient hooks as soon as
             backward has filled it, in reverse parameter order, as DDP does
  ring       the buckets, with our own ring all-reduce (reduce-scatter + all-gather) of point-to-point sends
--compress fp16|bf16 casts each bucket before the all-reduce and back after, as DDP's compression hooks do.
Writes results_all_reduce.json (--sync overlap) or results_all_reduce_<sync>.json unless --output is given.
"""
import torch
import torch.distributed as dist
import torch.nn as nn

import common
import data
import measure

METHOD = "Manual All-Reduce"
SYNC_MODES = ("overlap", "bucketed", "per-param", "ring")  # the first is the default
COMPRESSION = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = common.make_parser(__doc__.splitlines()[0])
    p.add_argument("--sync", choices=SYNC_MODES, default=SYNC_MODES[0], help="how gradients are synchronized "
                   "(see the module docstring)")
    p.add_argument("--bucket-mb", type=common.positive(float), default=25.0,
                   help="gradient bucket size in MiB (not per-param)")
    p.add_argument("--compress", choices=tuple(COMPRESSION), default="none",
                   help="dtype gradients travel in (bucketed modes), as DDP's fp16/bf16 compression hooks")
    args = common.parse(p, argv, lambda a: common.variant_output("all_reduce", a.sync, SYNC_MODES[0]))
    if args.compress != "none" and args.sync == "per-param":
        p.error("--compress needs buckets (use --sync bucketed, overlap or ring)")
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
class GradSync:
    """Averages a plain model's gradients over all ranks with one of SYNC_MODES and keeps parameters and
    buffers identical on all ranks the way DDP does (rank 0's copied at start, buffers before every forward).

    In the bucketed modes every gradient is a view of its bucket with its parameter's strides (DDP's
    gradient_as_bucket_view): backward accumulates straight into the buckets, nothing is copied.
    Like DDP without find_unused_parameters, every parameter must get exactly one gradient per step.
    """

    def __init__(self, model, mode, bucket_mb=25.0, compress="none"):
        self.mode, self.world_size, self.wire_dtype = mode, dist.get_world_size(), COMPRESSION[compress]
        self.names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
        self.params = [p for p in model.parameters() if p.requires_grad]
        reverse = self.params[::-1]  # the order backward produces gradients in
        self.buckets = [] if mode == "per-param" else [
            common.FlatBuffer(group) for group in common.split_buckets(reverse, bucket_mb * 2 ** 20)]
        for bucket in self.buckets:
            for p, view in zip(bucket.tensors, bucket.views):
                p.grad = view
        self.bucket_index = {id(p): i for i, b in enumerate(self.buckets) for p in b.tensors}
        self.buffers = common.flat_by_dtype(model.buffers())
        self.active = True  # False during the yardstick's no-communication steps
        self.ready, self.filled, self.in_flight = set(), [0] * len(self.buckets), []
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._grad_ready)
        self._broadcast(common.flat_by_dtype(self.params))

    def zero_grad(self):
        """Zeroes the gradients for the next backward (in place: they stay views of the buckets)."""
        for bucket in self.buckets:
            bucket.flat.zero_()
        for p in self.params if not self.buckets else ():
            p.grad = None

    def broadcast_buffers(self):
        """DDP's rule: every forward starts from rank 0's buffers (BatchNorm running statistics)."""
        self._broadcast(self.buffers)

    def _grad_ready(self, param):
        if not self.active:
            return
        if id(param) in self.ready:
            raise common.UserError(f"parameter {self.names[id(param)]} got a second gradient before the sync: "
                                   "like DDP outside no_sync(), the manual all-reduce allows one backward per step")
        self.ready.add(id(param))
        if self.mode == "overlap":
            self.filled[self.bucket_index[id(param)]] += 1
            # Launch strictly in bucket order, so every rank issues the same collectives in the same order.
            while len(self.in_flight) < len(self.buckets) and \
                    self.filled[len(self.in_flight)] == len(self.buckets[len(self.in_flight)].tensors):
                self.in_flight.append(self._all_reduce(self.buckets[len(self.in_flight)], async_op=True))

    def finish(self):
        """Call after backward: leaves every parameter's .grad holding the average over all ranks."""
        missing = [self.names[id(p)] for p in self.params if id(p) not in self.ready]
        self.ready, self.filled = set(), [0] * len(self.buckets)
        if missing:
            raise common.UserError(f"{len(missing)} parameter(s) got no gradient in this step (e.g. {missing[0]}): "
                                   "like DDP without find_unused_parameters, the manual all-reduce needs every "
                                   "parameter to take part in the loss (use another --arch)")
        if self.mode == "per-param":
            for p in self.params:
                dist.all_reduce(p.grad)
                p.grad.div_(self.world_size)
        elif self.mode == "overlap":
            for work, wire, bucket in self.in_flight:
                work.wait()
                if wire is not bucket.flat:
                    bucket.flat.copy_(wire)
            self.in_flight = []
        else:
            for bucket in self.buckets:
                self._all_reduce(bucket, async_op=False)

    def _all_reduce(self, bucket, async_op):
        # Divided before summing, as DDP does; compressed: cast, divide and sum in the wire dtype, cast back.
        wire = bucket.flat.div_(self.world_size) if self.wire_dtype is None else \
            bucket.flat.to(self.wire_dtype).div_(self.world_size)
        if self.mode == "ring":
            ring_all_reduce(wire)
            work = None
        else:
            work = dist.all_reduce(wire, async_op=async_op)
        if not async_op and wire is not bucket.flat:
            bucket.flat.copy_(wire)
        return work, wire, bucket

    @staticmethod
    @torch.no_grad()
    def _broadcast(flats):
        for buffer in flats:
            dist.broadcast(buffer.pack(), src=0)
            if dist.get_rank() != 0:
                buffer.unpack()


# --------------------------------------------------------------------------- training
def make_train_step(model, sync, optimizer, scaler, args, ctx):
    """One training step with our gradient synchronization; with communicate=False the same step with no
    communication at all (the yardstick's no-communication step)."""
    criterion = nn.CrossEntropyLoss()

    def train_step(images, targets, clock, lr, communicate=True):
        sync.active = communicate
        if communicate:
            sync.broadcast_buffers()
            clock.mark("buffers")
        with common.autocast(args, ctx):
            logits = model(images)
            loss = criterion(logits, targets)
        sync.zero_grad()
        scaler.scale(loss).backward()  # overlap: buckets start all-reducing from gradient hooks inside
        clock.mark("compute")
        if communicate:
            sync.finish()  # averages the scaled gradients; scaler.step unscales them, as under DDP
            clock.mark("comm")
        common.set_lr(optimizer, lr)
        scaler.step(optimizer)
        scaler.update()
        clock.mark("update")
        return loss, logits

    return train_step


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
        # Same seed on every rank gives the same initial weights; GradSync also broadcasts rank 0's, as DDP does.
        sync = GradSync(model, args.sync, args.bucket_mb, args.compress)
        optimizer = common.make_optimizer(args, model.parameters())
        scaler = common.make_scaler(args, ctx)
        step = make_train_step(model, sync, optimizer, scaler, args, ctx)
        grad_bytes = sum(p.numel() * p.element_size() for p in sync.params)
        wire_bytes = grad_bytes if sync.wire_dtype is None else grad_bytes // 2
        results = common.Results(args.output, METHOD, "all_reduce", ctx, args, info, writer=ctx.is_main,
                                 trainers=ctx.world_size, weights=weights, sync=args.sync, bucket_mb=args.bucket_mb,
                                 num_buckets=len(sync.buckets), compress=args.compress, gradient_bytes=grad_bytes,
                                 wire_bytes_per_step=wire_bytes)
        layout = f"{len(sync.buckets)} buckets of <= {args.bucket_mb:g} MiB" if sync.buckets else "one all-reduce each"
        common.log(ctx, f"{METHOD} (--sync {args.sync}, {len(sync.params)} gradient tensors in {layout}, "
                        f"compress {args.compress}): {ctx.world_size} processes ({ctx.backend}, "
                        f"{common.device_name(ctx.device)}), {args.arch} on {info.name} ({info.train_size} train / "
                        f"{info.val_size} val images, {info.image_size}px), {info.steps} steps/epoch, "
                        f"batch {args.batch_size}/process")
        resumed = common.load_checkpoint(args, ctx, owner=0, writer=0)
        if resumed:
            start, state, saved = resumed
            for part, obj in zip(("model", "optimizer", "scaler"), (model, optimizer, scaler)):
                obj.load_state_dict(state[part])
            results.resume(saved)
            common.log(ctx, f"resumed after epoch {start} from {common.checkpoint_dir(args)}")
        elif args.overhead_pairs:
            results.update(comm_overhead=measure_overhead(model, sync, optimizer, scaler, step, args, ctx, info))
        for epoch in range(1 + (resumed[0] if resumed else 0), args.epochs + 1):
            link = measure.read_link_bytes(ctx)
            record = measure.run_epoch(ctx, args, epoch, train_loader, info.steps, step)
            record["avg_comm_time"] = record["phase_times"]["comm"]  # the wait after backward (secondary)
            record["link"] = measure.busiest_link(ctx, link, record["steps"])
            record["val_loss"], record["val_accuracy"] = measure.evaluate(model, val_loader, ctx, args)
            results.add_epoch(record)
            common.checkpoint_epoch(args, ctx, epoch, results, state=None if ctx.rank else {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()})
            common.log(ctx, common.epoch_line(record))
            common.warn_if_data_bound(ctx, record)
        results.finish()
        common.log(ctx, f"wrote {args.output}")
        common.cleanup_distributed(barrier=True)
    finally:
        common.cleanup_distributed()


def measure_overhead(model, sync, optimizer, scaler, step, args, ctx, info):
    """The yardstick; for --sync overlap also the same buckets synchronized blocking after backward, so the
    share of communication hidden behind backward comes from two measurements of this run."""
    clock, lr = measure.NoClock(), common.lr_at(args, 0)
    kinds = {"comm": lambda x, y: step(x, y, clock, lr), "local": lambda x, y: step(x, y, clock, lr, False)}
    if args.sync == "overlap":
        def blocking(x, y):
            sync.mode = "bucketed"
            try:
                step(x, y, clock, lr)
            finally:
                sync.mode = "overlap"
        kinds["blocking"] = blocking
    with measure.preserved(model, optimizer, scaler):
        overhead = measure.measure_overhead(ctx, args, kinds, *measure.fixed_batch(args, info, ctx))
    hidden = overhead.get("hidden_share")
    common.log(ctx, f"communication overhead: {1e3 * overhead['overhead']:.1f} ms/step "
                    f"({100 * overhead['overhead_share']:.0f}% of a {1e3 * overhead['step_time']:.1f} ms step)"
                    + ("" if hidden is None else f"; blocking {1e3 * overhead['blocking_overhead']:.1f} ms, so "
                                                 f"{100 * hidden:.0f}% is hidden behind backward"))
    return overhead


if __name__ == "__main__":
    common.run_main(main)
