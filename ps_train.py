"""Parameter server: rank 0 holds the parameters and the optimizer, ranks 1..N-1 compute gradients.

    torchrun --nproc_per_node=4 ps_train.py --epochs 3 --batch-size 64 --workers 16 --data-dir ./ --backend nccl

Sync strategy: synchronous PS: each step every worker pulls the server's parameters, computes gradients on its
own shard and pushes them; the server averages them, takes the optimizer step and serves the result.

--comm chooses how pulls and pushes travel (the server's side of `collective` and `overlap` is the same):
  p2p         the guide's original: one dist.send / dist.recv per tensor and per worker (the reference).
  collective  (default) the guide's improvement: tensors packed into --bucket-mb flat buffers; pull =
              dist.broadcast from the server, push = dist.reduce(SUM) to the server (which adds zeros); all
              buckets in flight at once, so packing one overlaps the others' transfer; blocking per step.
  overlap     collective, BytePS-style: each gradient bucket is pushed (async reduce) from gradient hooks as
              soon as backward has produced it, buckets in reverse parameter order; the pull is launched
              async and each module waits, in a forward pre-hook, only for the bucket holding its own
              tensors. Communication hides behind backward and forward; a step exposes what remains.
BatchNorm: workers push their running statistics with their gradients; the server keeps the average and
serves it with the parameters, so every worker holds, and validates, the same model.
Mixed precision: bf16 needs no scaler. fp16 keeps DDP+GradScaler semantics: the server owns the GradScaler and
serves its scale with the parameters; workers push scaled gradients; the server averages them, unscales once,
skips the step on inf/NaN (one update, so every worker skips it) and adjusts the scale. The server's
parameters and optimizer state stay fp32.
"""
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

import common

METHOD = "Parameter Server (PS)"
SERVER = 0


def parse_args(argv=None):
    p = common.make_parser(__doc__.splitlines()[0], "results_ps.json")
    p.add_argument("--comm", choices=("p2p", "collective", "overlap"), default="collective",
                   help="how parameters and gradients travel (see the module docstring)")
    p.add_argument("--bucket-mb", type=common._positive(float), default=25.0,
                   help="flat-buffer size in MiB for --comm collective and overlap")
    for action in p._actions:
        if action.dest == "output":
            action.help = "results JSON path (a non-default --comm writes results_ps_<comm>.json)"
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.comm != "collective" and not any(a == "--output" or a.startswith("--output=") for a in argv):
        args.output = f"results_ps_{args.comm}.json"
    if args.comm == "p2p" and args.channels_last:
        raise common.UserError("--comm p2p sends each tensor as it is and needs contiguous tensors "
                               "(drop --channels-last or use --comm collective)")
    return args


# --------------------------------------------------------------------------- the exchange
def make_buckets(tensors, bucket_mb):
    """Consecutive groups of `tensors` of about `bucket_mb` MiB each (at least one tensor a group)."""
    buckets, size = [], 0
    for t in tensors:
        if not buckets or size + 4 * t.numel() > bucket_mb * 2**20:
            buckets.append([])
            size = 0
        buckets[-1].append(t)
        size += 4 * t.numel()
    return buckets


def pack(tensors):
    """One flat fp32 buffer (BatchNorm's integer counters too: exact below 2**24)."""
    return torch.cat([t.reshape(-1).float() for t in tensors])


@torch.no_grad()
def unpack(flat, tensors):
    """Copies a flat buffer back into `tensors` (in their own dtype and memory format)."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()


class PSComm:
    """The server <-> worker exchange of one model. Both roles call `pull` then `push` each step, in the
    same order: `pull` serves the server's state (parameters, buffers, loss scale) to the workers, `push`
    leaves the sum of the workers' gradients and buffers on the server, which `average` turns into means.
    """

    def __init__(self, model, comm, num_workers, bucket_mb=25.0):
        self.comm, self.num_workers = comm, num_workers
        self.is_server = dist.get_rank() == SERVER
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buffers = list(model.buffers())
        device = self.params[0].device
        self.scale = torch.ones((), device=device)  # the fp16 loss scale (1 otherwise), served by the server
        # Pulled in module order, so a module's own tensors sit in one bucket (overlap waits for just it).
        self.state = [t for m in model.modules() for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))]
        self.state.append(self.scale)
        self.pull_buckets = make_buckets(self.state, bucket_mb)
        # Pushed in the order backward produces gradients; buffers after, once backward is done.
        self.push_items = self.params[::-1] + self.buffers
        self.push_buckets = make_buckets(self.params[::-1], bucket_mb) + make_buckets(self.buffers, bucket_mb)
        self.in_sync, self.pending, self.works, self.clock = False, {}, [], None
        if self.is_server:
            for p in self.params:
                p.grad = torch.zeros_like(p)
        elif comm == "overlap":
            self._install_hooks(model)

    def messages_per_step(self):
        """Messages per step, both directions, as the server sees them."""
        if self.comm == "p2p":
            return self.num_workers * (len(self.state) + len(self.push_items))
        return len(self.pull_buckets) + len(self.push_buckets)

    # Pull: server -> workers --------------------------------------------------------------------------
    def pull(self, clock=None):
        """Serves the server's state to every worker (a no-op when the workers already hold it)."""
        if self.in_sync:
            return
        self.in_sync, self.clock = True, clock
        if self.comm == "p2p":  # the guide's original: every tensor to every worker, one at a time
            for t in self.state:
                if self.is_server:
                    for worker in range(1, self.num_workers + 1):
                        dist.send(t.detach(), dst=worker)
                else:
                    dist.recv(t.detach(), src=SERVER)
        elif self.is_server or self.comm == "collective":
            # Every bucket in flight, then all waited for: packing or unpacking one overlaps the others' transfer.
            works = []
            for bucket in self.pull_buckets:
                flat = pack(bucket) if self.is_server else self._empty(bucket)
                works.append((dist.broadcast(flat, src=SERVER, async_op=True), flat, bucket))
            for work, flat, bucket in works:
                work.wait()
                if not self.is_server:
                    unpack(flat, bucket)
        else:  # overlap worker: start every bucket now; each module's forward pre-hook waits for its own
            for i, bucket in enumerate(self.pull_buckets):
                flat = self._empty(bucket)
                self.pending[i] = (dist.broadcast(flat, src=SERVER, async_op=True), flat)

    def finish_pull(self):
        """Waits for what the forward pass did not need yet (overlap), e.g. the loss scale."""
        self._wait_pull(sorted(self.pending))

    def sync(self):
        """A whole pull: after it the workers hold the server's latest state (e.g. to validate it)."""
        self.pull()
        self.finish_pull()

    def _wait_pull(self, indices):
        for i in indices:
            if i in self.pending:
                work, flat = self.pending.pop(i)
                self._mark("compute")
                work.wait()
                unpack(flat, self.pull_buckets[i])
                self._mark("pull")

    # Push: workers -> server --------------------------------------------------------------------------
    def push(self):
        """Sends the workers' gradients and buffers; on the server, leaves their sums in .grad and buffers."""
        self.in_sync = False
        if self.comm == "p2p":  # the guide's original: every tensor from every worker, one at a time
            for t in self.push_items:
                if self.is_server:
                    total = torch.zeros_like(self._slot(t))
                    for worker in range(1, self.num_workers + 1):
                        got = torch.empty_like(total)
                        dist.recv(got, src=worker)
                        total += got
                    self._slot(t).copy_(total)
                else:
                    dist.send(self._outgoing(t), dst=SERVER)
        elif self.is_server or self.comm == "collective":
            works = []
            for bucket in self.push_buckets:
                flat = self._empty(bucket).zero_() if self.is_server else pack([self._outgoing(t) for t in bucket])
                # the server's zeros plus every worker's tensors
                works.append((dist.reduce(flat, dst=SERVER, async_op=True), flat, bucket))
            for work, flat, bucket in works:
                work.wait()
                if self.is_server:
                    unpack(flat, [self._slot(t) for t in bucket])
        else:  # overlap worker: the gradient hooks have sent most buckets already; send the rest, then wait
            self._launch_ready(flush=True)
            for work, _ in self.works:
                work.wait()
            self.works, self.launched = [], 0
            self.ready = [0] * len(self.push_buckets)

    @torch.no_grad()
    def average(self):
        """Server: the pushed sums become the workers' mean gradient and mean BatchNorm buffers."""
        for t in self.push_items:
            slot = self._slot(t)
            slot.div_(self.num_workers) if slot.is_floating_point() else slot.floor_divide_(self.num_workers)

    # Overlap hooks ------------------------------------------------------------------------------------
    def _install_hooks(self, model):
        pull_bucket = {id(t): i for i, bucket in enumerate(self.pull_buckets) for t in bucket}
        for m in model.modules():
            own = {pull_bucket[id(t)] for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))}
            if own:
                m.register_forward_pre_hook(lambda module, inputs, own=sorted(own): self._wait_pull(own))
        self.push_bucket = {id(p): i for i, bucket in enumerate(self.push_buckets) for p in bucket}
        self.ready, self.launched = [0] * len(self.push_buckets), 0
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def _grad_ready(self, param):
        self.ready[self.push_bucket[id(param)]] += 1
        self._launch_ready()

    def _launch_ready(self, flush=False):
        # Every rank must issue collectives in the same order: a full bucket never overtakes an earlier one.
        while self.launched < len(self.push_buckets) and (
                flush or self.ready[self.launched] == len(self.push_buckets[self.launched])):
            flat = pack([self._outgoing(t) for t in self.push_buckets[self.launched]])
            self.works.append((dist.reduce(flat, dst=SERVER, async_op=True), flat))
            self.launched += 1

    # Helpers ------------------------------------------------------------------------------------------
    def _empty(self, bucket):
        return torch.empty(sum(t.numel() for t in bucket), device=self.scale.device)

    @staticmethod
    def _outgoing(t):  # a worker's pushed tensor: a parameter's gradient (zeros if unused), or a buffer
        if isinstance(t, nn.Parameter):
            return t.grad.detach() if t.grad is not None else torch.zeros_like(t)
        return t.detach()

    @staticmethod
    def _slot(t):  # where the server keeps the pushed sum: the parameter's .grad, or the buffer itself
        return t.grad if isinstance(t, nn.Parameter) else t

    def _mark(self, name):
        if self.clock is not None:
            self.clock.mark(name)


# --------------------------------------------------------------------------- one step on each side
def serve_scale(comm, scaler):
    """Puts the scaler's current loss scale (1 without fp16) into the state the next pull serves."""
    comm.scale.copy_(scaler.scale(torch.ones((), device=comm.scale.device)))


def server_step(comm, optimizer, scaler):
    """Serve the parameters, gather the workers' gradients, average them and update.

    Returns seconds spent serving the pull, waiting for the push (which includes the workers' compute),
    and aggregating + updating.
    """
    device = comm.scale.device
    t0 = time.perf_counter()
    serve_scale(comm, scaler)
    comm.pull()
    common.synchronize(device)
    t1 = time.perf_counter()
    comm.push()
    common.synchronize(device)
    t2 = time.perf_counter()
    comm.average()
    scaler.step(optimizer)  # fp16: unscales the mean gradient once, skips the step on inf/NaN
    scaler.update()
    serve_scale(comm, scaler)  # the next pull may be the epoch's final sync
    common.synchronize(device)
    return t1 - t0, t2 - t1, time.perf_counter() - t2


def worker_step(model, comm, criterion, images, targets, args, ctx, clock):
    """Pull the parameters, forward and backward, push the gradients. Returns (loss, logits)."""
    comm.pull(clock)
    clock.mark("pull")
    with common.autocast(args, ctx):
        logits = model(images)
        loss = criterion(logits, targets)
    comm.finish_pull()
    clock.mark("compute")
    model.zero_grad(set_to_none=True)
    (loss * comm.scale).backward()  # overlap: the gradient hooks push buckets while backward runs
    clock.mark("compute")
    comm.push()
    clock.mark("push")
    return loss, logits


# --------------------------------------------------------------------------- epochs
def train_one_epoch(model, comm, criterion, loader, steps, epoch, ctx, args, workers):
    """A worker's epoch; returns its metrics (reduced over the workers' group)."""

    def train_step(images, targets, clock):
        return worker_step(model, comm, criterion, images, targets, args, ctx, clock)

    record = common.run_epoch(ctx, args, epoch, loader, steps, train_step, log_rank=1, group=workers)
    comm.sync()  # the epoch's last update, so every worker validates the same, final model
    return record


def serve_one_epoch(comm, optimizer, scaler, steps, epoch, ctx, args):
    """The server's epoch: `steps` server steps, then the final pull. Returns mean (pull, push, update)
    seconds per step, leaving out the warm-up steps as run_epoch does."""
    from tqdm import tqdm
    warmup = min(args.warmup_steps, steps - 1) if epoch == 1 else 0
    times = [server_step(comm, optimizer, scaler)
             for _ in tqdm(range(steps), desc=f"epoch {epoch} [server: batches served]", leave=False,
                           position=1, dynamic_ncols=True, file=sys.stdout,
                           disable=not sys.stdout.isatty())]  # a second bar's cursor moves garble logs
    comm.sync()
    return torch.tensor(times[warmup:], dtype=torch.float64, device=ctx.device).mean(0)


def main(argv=None):
    args = parse_args(argv)
    common.check_output_path(args.output)
    ctx = common.setup_distributed(args)
    try:
        if ctx.world_size < 2:
            raise common.UserError("the parameter server needs at least 2 processes, a server and a worker "
                                   "(run with torchrun --nproc_per_node=2 or more)")
        is_server, num_workers = ctx.rank == SERVER, ctx.world_size - 1
        workers = dist.new_group(ranks=list(range(1, ctx.world_size)))  # every rank must call new_group
        # Workers shard the data among themselves; the server needs only the step count (the same for all).
        train_loader, val_loader, info, steps = common.build_data(
            args, ctx, num_workers, max(0, ctx.rank - 1), load=not is_server)
        model, weights = common.build_model(args, ctx, info.num_classes)
        # Same seed everywhere gives the same initial weights; the first pull serves the server's anyway.
        comm = PSComm(model, args.comm, num_workers, args.bucket_mb)
        if is_server:
            optimizer = common.make_optimizer(args, model.parameters())
            scaler = common.make_scaler(args, ctx)
        criterion = nn.CrossEntropyLoss()
        state_mb = sum(4 * t.numel() for t in comm.state) / 1e6
        results = common.Results(args.output, METHOD, ctx, args, info, ctx.rank == 1, kind="ps",
                                 num_workers=num_workers, comm=args.comm, mode="sync", weights=weights,
                                 steps_per_epoch=steps, bucket_mb=args.bucket_mb, state_mb=state_mb,
                                 messages_per_step=comm.messages_per_step())
        common.log(ctx, f"{METHOD} server (rank 0): {num_workers} workers, --comm {args.comm}, "
                        f"{state_mb:.1f} MB of state, {comm.messages_per_step()} messages/step", rank=SERVER)
        common.log(ctx, f"{METHOD} workers (ranks 1-{num_workers}): {ctx.backend}, {common.device_name(ctx.device)}, "
                        f"{args.arch} on {info.name} ({info.train_size} train / {info.val_size} val images, "
                        f"{info.image_size}px), {steps} steps/epoch, batch {args.batch_size}/worker", rank=1)
        for epoch in range(1, args.epochs + 1):
            server_times = torch.zeros(3, dtype=torch.float64, device=ctx.device)
            if is_server:
                server_times = serve_one_epoch(comm, optimizer, scaler, steps, epoch, ctx, args)
                common.log(ctx, f"server epoch {epoch}: served {steps} batches x {num_workers} workers | "
                                f"per step: pull {1e3 * server_times[0]:.1f}ms, waiting for push "
                                f"{1e3 * server_times[1]:.1f}ms, aggregate+update {1e3 * server_times[2]:.1f}ms",
                           rank=SERVER)
                dist.send(server_times, dst=1)
                continue
            record = train_one_epoch(model, comm, criterion, train_loader, steps, epoch, ctx, args, workers)
            waits = torch.tensor([record["phase_times"].get(k, 0.0) for k in ("pull", "push", "compute")],
                                 dtype=torch.float64, device=ctx.device)
            pull, push, compute = (common.all_reduce_sum(waits, workers) / num_workers).tolist()
            if ctx.rank == 1:
                dist.recv(server_times, src=SERVER)
            record.update(avg_comm_time_pull=pull, avg_comm_time_push=push, avg_comm_time=pull + push,
                          avg_compute_time=compute, avg_server_pull_time=server_times[0].item(),
                          avg_server_push_wait_time=server_times[1].item(),
                          avg_server_update_time=server_times[2].item())
            record["val_loss"], record["val_accuracy"] = common.evaluate(model, val_loader, ctx, args, workers)
            results.add_epoch(record)
            common.log(ctx, common.epoch_line(record) + f" | server update {1e3 * record['avg_server_update_time']:.1f}ms",
                       rank=1)
            common.warn_if_data_bound(ctx, record, log_rank=1)
        dist.barrier()  # the server stays in the group until the workers have validated
        results.finish()
        common.log(ctx, f"wrote {args.output}", rank=1)
    finally:
        common.cleanup_distributed()


if __name__ == "__main__":
    common.run_main(main)
