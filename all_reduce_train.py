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
import driver
from modes import DEFAULT_BUCKET_MB, SYNC_MODES, variant_output

COMPRESSION = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = common.make_parser(__doc__, lambda a: variant_output("all_reduce", a.sync, SYNC_MODES[0]))
    p.add_argument("--sync", choices=SYNC_MODES, default=SYNC_MODES[0], help="how gradients are synchronized")
    p.add_argument("--bucket-mb", type=common.positive(float), default=DEFAULT_BUCKET_MB,
                   help="gradient bucket size in MiB (not per-param)")
    p.add_argument("--compress", choices=tuple(COMPRESSION), default="none",
                   help="dtype gradients travel in (bucketed modes), as DDP's fp16/bf16 compression hooks")
    args = common.parse(p, argv)
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
        self.kind = "comm"  # the step's kind (see begin)
        self.ready, self.filled, self.in_flight = set(), [0] * len(self.buckets), []
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._grad_ready)
        self._broadcast(common.flat_by_dtype(self.params))

    def begin(self, kind):
        """A step of `kind` starts: "comm" synchronizes as the mode says, "blocking" the same buckets after
        backward, "local" not at all (the yardstick's kinds)."""
        self.kind = kind

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
        if self.kind == "local":
            return
        if id(param) in self.ready:
            raise common.UserError(f"parameter {self.names[id(param)]} got a second gradient before the sync: "
                                   "like DDP outside no_sync(), the manual all-reduce allows one backward per step")
        self.ready.add(id(param))
        if self.mode == "overlap" and self.kind == "comm":
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
        elif self.mode == "overlap" and self.kind == "comm":
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
    """One training step with our gradient synchronization; kind "local": the same step with no communication at
    all (the yardstick's no-communication step); "blocking": --sync overlap's buckets synchronized after backward."""
    criterion = nn.CrossEntropyLoss()

    def train_step(images, targets, clock, lr, kind="comm"):
        sync.begin(kind)
        if kind != "local":
            sync.broadcast_buffers()
            clock.mark("buffers")
        with common.autocast(args, ctx):
            logits = model(images)
            loss = criterion(logits, targets)
        sync.zero_grad()
        scaler.scale(loss).backward()  # overlap: buckets start all-reducing from gradient hooks inside
        clock.mark("compute")
        if kind != "local":
            sync.finish()  # averages the scaled gradients; scaler.step unscales them, as under DDP
            clock.mark("comm")
        common.set_lr(optimizer, lr)
        scaler.step(optimizer)
        scaler.update()
        clock.mark("update")
        return loss, logits

    return train_step


def make_method(args, ctx, info, model, weights=None):
    """Our synchronization on `model`, its optimizer and step, as the driver runs them."""
    # Same seed on every rank gives the same initial weights; GradSync also broadcasts rank 0's, as DDP does.
    sync = GradSync(model, args.sync, args.bucket_mb, args.compress)
    optimizer = common.make_optimizer(args, model.parameters())
    scaler = common.make_scaler(args, ctx)
    grad_bytes = sum(p.numel() * p.element_size() for p in sync.params)
    layout = f"{len(sync.buckets)} buckets of <= {args.bucket_mb:g} MiB" if sync.buckets else "one all-reduce each"
    return driver.Method(
        kind="all_reduce", description=f"--sync {args.sync}, {len(sync.params)} gradient tensors in {layout}, "
                                       f"compress {args.compress}",
        settings=dict(sync=args.sync, bucket_mb=args.bucket_mb, compress=args.compress), model=model,
        step=make_train_step(model, sync, optimizer, scaler, args, ctx),
        state={"model": model, "optimizer": optimizer, "scaler": scaler}, trainers=list(range(ctx.world_size)),
        overlaps=args.sync == "overlap",
        figures=lambda record, _: {"avg_comm_time": record["phase_times"]["comm"]},  # the wait after backward
        fields=dict(weights=weights, num_buckets=len(sync.buckets), gradient_bytes=grad_bytes,
                    wire_bytes_per_step=grad_bytes if sync.wire_dtype is None else grad_bytes // 2))


def main(argv=None):
    args = parse_args(argv)
    with driver.session(args) as ctx:
        ds = data.open_data(args, ctx, ctx.world_size)
        model, weights = common.build_model(args, ctx, ds.info.num_classes)
        driver.train(args, ctx, ds, make_method(args, ctx, ds.info, model, weights))


if __name__ == "__main__":
    common.run_main(main)
