"""Parameter server: rank 0 holds the parameters and the optimizer, ranks 1..N-1 compute gradients.

    torchrun --nproc_per_node=4 ps_train.py --epochs 3 --batch-size 64 --workers 16 --data-dir ./ --backend nccl

Sync strategy: synchronous PS. Each step every worker pulls the server's parameters, computes gradients on its
own shard and pushes them; the server averages them, takes the optimizer step and serves the result.
--comm chooses how pulls and pushes travel (the server's side of collective and overlap is the same):
  p2p         the guide's original: one dist.send / dist.recv per tensor and per worker (a star).
  collective  (default) the guide's improvement: tensors packed into --bucket-mb flat buffers; pull =
              dist.broadcast from the server, push = dist.reduce(SUM) to it; all buckets in flight at once.
  overlap     collective, BytePS-style: each gradient bucket is pushed (async reduce) from gradient hooks as
              soon as backward has filled it; the pull is launched async and each module's forward waits, in a
              pre-hook, only for the bucket holding its own tensors.
BatchNorm: workers push their running statistics with their gradients; the server keeps the mean and serves
it with the parameters, so every worker holds, and validates, the same model. The server validates its share
of the val set too. Mixed precision: fp16 keeps DDP+GradScaler semantics: the server owns the GradScaler and
serves its scale with the parameters; workers push scaled gradients; the server averages, unscales once, skips
the step on inf/NaN for everyone and adjusts the scale. The server's parameters stay fp32.
Writes results_ps.json (--comm collective) or results_ps_<comm>.json unless --output is given.
"""
import torch
import torch.distributed as dist
import torch.nn as nn

import common
import data
import measure

METHOD = "Parameter Server (PS)"
SERVER = 0
COMMS = ("collective", "p2p", "overlap")  # the first is the default


def parse_args(argv=None):
    p = common.make_parser(__doc__.splitlines()[0])
    p.add_argument("--comm", choices=COMMS, default=COMMS[0], help="how parameters and gradients travel "
                   "(see the module docstring)")
    p.add_argument("--bucket-mb", type=common.positive(float), default=25.0,
                   help="flat-buffer size in MiB for --comm collective and overlap")
    args = common.parse(p, argv, lambda a: common.variant_output("ps", a.comm, COMMS[0]))
    if args.comm == "p2p" and args.channels_last:
        p.error("--comm p2p sends each tensor as it is and needs contiguous tensors (drop --channels-last "
                "or use --comm collective)")
    return args


# --------------------------------------------------------------------------- what travels
class Layout:
    """The server's state as served (parameters and buffers in module order, so one module's tensors share a
    bucket, then the fp16 loss scale) and as pushed (gradients in the order backward produces them, then
    buffers), each cut into float32 flat buckets. Gradients are views of the push buckets, on the server (one
    division per bucket averages them) and on the workers (backward writes straight into what is pushed)."""

    def __init__(self, model, bucket_mb):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buffers = list(model.buffers())
        self.scale = torch.ones((), device=self.params[0].device)  # 1 unless the server's GradScaler says
        self.served = [t for m in model.modules() for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))]
        self.served.append(self.scale)
        cap = bucket_mb * 2 ** 20
        self.pull = [common.FlatBuffer(g, torch.float32) for g in common.split_buckets(self.served, cap, False)]
        grads = [common.FlatBuffer(g, torch.float32) for g in common.split_buckets(self.params[::-1], cap, False)]
        for bucket in grads:
            for p, view in zip(bucket.tensors, bucket.views):
                p.grad = view
        self.grad_buckets = grads
        self.buffer_buckets = [common.FlatBuffer(g, torch.float32)
                               for g in common.split_buckets(self.buffers, cap, False)]
        self.push = grads + self.buffer_buckets

    def zero_grad(self):
        for bucket in self.push:
            bucket.flat.zero_()

    @torch.no_grad()
    def average(self, num_workers):
        """Server: the pushed sums become means (buffers too; integer counters were pushed as floats)."""
        for bucket in self.push:
            bucket.flat.div_(num_workers)
        for bucket in self.buffer_buckets:
            bucket.unpack()  # into the model's buffers; gradients are views already


# --------------------------------------------------------------------------- how it travels
class Transport:
    """Both roles call pull() then push() each step, in the same order. pull() is skipped while the workers
    already hold the server's state (after the epoch's final pull); push() leaves the sums on the server."""

    def __init__(self, layout, num_workers, is_server):
        self.layout, self.num_workers, self.is_server = layout, num_workers, is_server
        self.workers = range(1, num_workers + 1)
        self.fresh, self.active, self.clock = False, True, measure.NoClock()

    def pull(self):
        if not self.fresh:
            self.fresh = True
            self._pull()

    def finish_pull(self):
        """Waits for what the forward pass did not need (overlap)."""

    def push(self):
        self.fresh = False
        self._push()


class P2P(Transport):
    """The guide's original, tensor by tensor: the server sends every tensor to every worker, then receives
    every gradient (and buffer) from every worker and sums them. A star: all of it crosses the server's link."""

    def _pull(self):
        for t in self.layout.served:
            if self.is_server:
                for worker in self.workers:
                    dist.send(t.detach(), dst=worker)
            else:
                dist.recv(t.detach(), src=SERVER)

    def _push(self):
        for bucket in self.layout.push:
            for t, slot in zip(bucket.tensors, bucket.views):
                outgoing = t.grad if isinstance(t, nn.Parameter) else t
                if self.is_server:
                    slot.zero_()
                    got = torch.empty_like(outgoing, dtype=torch.float32)
                    for worker in self.workers:
                        dist.recv(got, src=worker)
                        slot.add_(got)
                elif isinstance(t, nn.Parameter):
                    dist.send(outgoing, dst=SERVER)
                else:
                    dist.send(outgoing.float(), dst=SERVER)


class Collective(Transport):
    """The guide's improvement: flat buckets, pull = broadcast from the server, push = reduce(SUM) to it
    (the server adds zeros). Every bucket is in flight at once; then all are waited for."""

    @torch.no_grad()
    def _pull(self):
        works = [dist.broadcast(b.pack() if self.is_server else b.flat, src=SERVER, async_op=True)
                 for b in self.layout.pull]
        for work, bucket in zip(works, self.layout.pull):
            work.wait()
            if not self.is_server:
                bucket.unpack()

    @torch.no_grad()
    def _push(self):
        works = [self._reduce(bucket) for bucket in self.layout.push]
        for work in works:
            work.wait()

    def _reduce(self, bucket):
        if self.is_server:
            bucket.flat.zero_()
        elif bucket in self.layout.buffer_buckets:
            bucket.pack()  # gradients are in their bucket already
        return dist.reduce(bucket.flat, dst=SERVER, async_op=True)


class Overlap(Collective):
    """Collective on the server; on a worker, pushes start from gradient hooks during backward (in bucket
    order, so every rank issues the same collectives), and each module waits in a forward pre-hook only
    for the pull bucket holding its own tensors."""

    def __init__(self, layout, num_workers, is_server, model):
        super().__init__(layout, num_workers, is_server)
        self.pending, self.pushes, self.filled = {}, [], [0] * len(layout.push)
        self.grad_buckets = len(layout.grad_buckets)
        if is_server:
            return
        pull_of = {id(t): i for i, b in enumerate(layout.pull) for t in b.tensors}
        for m in model.modules():
            own = sorted({pull_of[id(t)] for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))})
            if own:
                m.register_forward_pre_hook(lambda module, inputs, own=own: self._wait_pull(own))
        self.push_of = {id(p): i for i, b in enumerate(layout.grad_buckets) for p in b.tensors}
        for p in layout.params:
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def _pull(self):
        if self.is_server:
            return super()._pull()
        self.pending = {i: dist.broadcast(b.flat, src=SERVER, async_op=True) for i, b in enumerate(self.layout.pull)}

    def finish_pull(self):
        self._wait_pull(sorted(self.pending))

    @torch.no_grad()
    def _wait_pull(self, indices):
        for i in indices:
            if i in self.pending:
                self.clock.mark("compute")
                self.pending.pop(i).wait()
                self.layout.pull[i].unpack()
                self.clock.mark("pull")

    def _grad_ready(self, param):
        if not self.active:
            return
        self.filled[self.push_of[id(param)]] += 1
        while len(self.pushes) < self.grad_buckets and \
                self.filled[len(self.pushes)] == len(self.layout.push[len(self.pushes)].tensors):
            self.pushes.append(self._reduce(self.layout.push[len(self.pushes)]))

    @torch.no_grad()
    def _push(self):
        if self.is_server:
            return super()._push()
        # Buckets whose gradients never all arrived (unused parameters) go now, then the buffers.
        self.pushes += [self._reduce(b) for b in self.layout.push[len(self.pushes):]]
        for work in self.pushes:
            work.wait()
        self.pushes, self.filled = [], [0] * len(self.layout.push)


TRANSPORTS = {"p2p": P2P, "collective": Collective, "overlap": Overlap}


def make_transport(comm, layout, num_workers, is_server, model):
    if comm == "overlap":
        return Overlap(layout, num_workers, is_server, model)
    return TRANSPORTS[comm](layout, num_workers, is_server)


# --------------------------------------------------------------------------- one step on each side
def serve(comm, scaler):
    """Server: puts the loss scale (1 without fp16) into the served state, then serves a pull."""
    comm.layout.scale.copy_(scaler.scale(torch.ones((), device=comm.layout.scale.device)))
    comm.pull()
    comm.finish_pull()


def server_step(comm, optimizer, scaler, lr, clock):
    """Serve the parameters, gather the workers' gradients, average them and update."""
    serve(comm, scaler)
    clock.mark("serve")
    comm.push()
    clock.mark("push_wait")  # includes the workers' forward and backward
    comm.layout.average(comm.num_workers)
    common.set_lr(optimizer, lr)
    scaler.step(optimizer)  # fp16: unscales the mean gradient once, skips the step on inf/NaN
    scaler.update()
    clock.mark("update")


def make_worker_step(model, comm, args, ctx):
    """A worker's step: pull, forward and backward, push. (The lr is the server's business.)"""
    criterion = nn.CrossEntropyLoss()

    def train_step(images, targets, clock, lr=None):
        comm.clock = clock
        comm.pull()
        clock.mark("pull")
        with common.autocast(args, ctx):
            logits = model(images)  # overlap: each module first waits for its own pull bucket
            loss = criterion(logits, targets)
        comm.finish_pull()
        clock.mark("compute")
        comm.layout.zero_grad()
        (loss * comm.layout.scale).backward()  # overlap: the gradient hooks push buckets while backward runs
        clock.mark("compute")
        comm.push()
        clock.mark("push")
        return loss, logits

    return train_step


# --------------------------------------------------------------------------- the yardstick
def measure_overhead(model, comm, optimizer, scaler, args, ctx, info, workers):
    """The yardstick: a worker's step against the same step with a local SGD update and no communication
    while the server waits; runs of 2, because a pull waits for the server's update of the step before.
    For --comm overlap also the collective (blocking) exchange of the same buckets. Returns the block
    (None on the server)."""
    kinds = ["comm", "local"] + (["blocking"] if isinstance(comm, Overlap) else [])
    lr, clock = common.lr_at(args, 0), measure.NoClock()
    if comm.is_server:
        with measure.preserved(model, optimizer, scaler):
            for kind, _ in measure.overhead_schedule(kinds, args.overhead_pairs, run_length=2):
                if kind != "local":
                    server_step(comm, optimizer, scaler, lr, clock)
        return None
    real = make_worker_step(model, comm, args, ctx)
    blocking = make_worker_step(model, Collective(comm.layout, comm.num_workers, False), args, ctx)
    local_opt, local_scaler = common.make_optimizer(args, model.parameters()), common.make_scaler(args, ctx)
    criterion = nn.CrossEntropyLoss()

    def local(images, targets):
        with common.autocast(args, ctx):
            loss = criterion(model(images), targets)
        comm.layout.zero_grad()
        local_scaler.scale(loss).backward()
        local_scaler.step(local_opt)
        local_scaler.update()

    def hooks_off(fn):  # the overlap transport's hooks stay quiet: nothing is pushed from backward
        def run(images, targets):
            comm.active = False
            try:
                fn(images, targets, clock)
            finally:
                comm.active = True
        return run

    steps = {"comm": lambda x, y: real(x, y, clock), "local": hooks_off(lambda x, y, c: local(x, y)),
             "blocking": hooks_off(blocking)}
    with measure.preserved(model):
        return measure.measure_overhead(ctx, args, {k: steps[k] for k in kinds}, *measure.fixed_batch(args, info, ctx),
                                       group=workers, run_length=2)


# --------------------------------------------------------------------------- epochs
def serve_epoch(comm, optimizer, scaler, epoch, steps, args, ctx):
    """The server's epoch: `steps` server steps, then the final pull, as part of the last step (the workers
    then validate the epoch's model). Returns [serve, push wait, update] mean seconds per step, and the lrs."""
    clock, lrs = measure.StepClock(ctx.device), []
    warmup = min(args.warmup_steps, steps - 1) if epoch == 1 else 0
    for step in range(steps):
        clock.begin()
        lrs.append(common.lr_at(args, epoch - 1 + step / steps))
        server_step(comm, optimizer, scaler, lrs[-1], clock)
    serve(comm, scaler)
    clock.mark("serve")
    sums = clock.phase_sums(skip=warmup)
    return [sums.get(k, 0.0) / (steps - warmup) for k in ("serve", "push_wait", "update")], lrs


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
        ds = data.open_data(args, ctx, num_workers)  # the workers shard the training set among themselves
        info = ds.info
        train_loader = None if is_server else data.train_loader(ds, args, ctx, num_workers, ctx.rank - 1)
        val_loader = data.val_loader(ds, args, ctx, ctx.world_size, ctx.rank)  # the server validates too
        model, weights = common.build_model(args, ctx, info.num_classes)
        layout = Layout(model, args.bucket_mb)
        comm = make_transport(args.comm, layout, num_workers, is_server, model)
        optimizer = common.make_optimizer(args, model.parameters()) if is_server else None
        scaler = common.make_scaler(args, ctx)
        step = None if is_server else make_worker_step(model, comm, args, ctx)
        state_bytes = sum(4 * t.numel() for t in layout.served)
        results = common.Results(args.output, METHOD, "ps", ctx, args, info, writer=ctx.rank == 1,
                                 trainers=num_workers, num_workers=num_workers, comm=args.comm, weights=weights,
                                 bucket_mb=args.bucket_mb, state_bytes=state_bytes,
                                 messages_per_step=(num_workers * (len(layout.served) + len(layout.params)
                                                                   + len(layout.buffers))
                                                    if args.comm == "p2p" else len(layout.pull) + len(layout.push)))
        common.log(ctx, f"{METHOD} server (rank 0): {num_workers} workers, --comm {args.comm}, "
                        f"{state_bytes / 1e6:.1f} MB of state, {results.data['messages_per_step']} messages/step")
        common.log(ctx, f"{METHOD} workers (ranks 1-{num_workers}): {ctx.backend}, {common.device_name(ctx.device)}, "
                        f"{args.arch} on {info.name} ({info.train_size} train / {info.val_size} val images, "
                        f"{info.image_size}px), {info.steps} steps/epoch, batch {args.batch_size}/worker", rank=1)
        resumed = common.load_checkpoint(args, ctx, owner=SERVER, writer=1)
        if resumed:  # the server takes the training state back; the workers get it with the first pull
            if is_server:
                for part, obj in zip(("model", "optimizer", "scaler"), (model, optimizer, scaler)):
                    obj.load_state_dict(resumed[1][part])
            results.resume(resumed[2])
            common.log(ctx, f"resumed after epoch {resumed[0]} from {common.checkpoint_dir(args)}", rank=1)
        elif args.overhead_pairs:
            overhead = measure_overhead(model, comm, optimizer, scaler, args, ctx, info, workers)
            if not is_server:
                results.update(comm_overhead=overhead)
                common.log(ctx, f"communication overhead: {1e3 * overhead['overhead']:.1f} ms/step "
                                f"({100 * overhead['overhead_share']:.0f}% of a "
                                f"{1e3 * overhead['step_time']:.1f} ms step)", rank=1)
        if is_server:
            serve(comm, scaler)  # the initial state, before any clock (as DDP broadcasts at wrap)
        else:
            comm.pull()
            comm.finish_pull()
        for epoch in range(1 + (resumed[0] if resumed else 0), args.epochs + 1):
            link = measure.read_link_bytes(ctx)
            if is_server:
                times, lrs = serve_epoch(comm, optimizer, scaler, epoch, info.steps, args, ctx)
                record = None
            else:
                record = measure.run_epoch(ctx, args, epoch, train_loader, info.steps, step, group=workers,
                                          end_of_epoch=lambda clock: (comm.pull(), comm.finish_pull(),
                                                                      clock.mark("pull")))
                times, lrs = [0.0] * 3, [0.0] * info.steps
            link = measure.busiest_link(ctx, link, info.steps)
            # The server's clocks and learning rates, to every rank (the workers contribute zeros).
            server = measure.all_reduce(torch.tensor(times + lrs, dtype=torch.float64, device=ctx.device)).tolist()
            val_loss, val_accuracy = measure.evaluate(model, val_loader, ctx, args)
            if is_server:
                common.log(ctx, f"server epoch {epoch}: served {info.steps} steps x {num_workers} workers | per "
                                f"step: serve {1e3 * times[0]:.1f}ms, wait for pushes {1e3 * times[1]:.1f}ms, "
                                f"aggregate+update {1e3 * times[2]:.1f}ms")
                common.checkpoint_epoch(args, ctx, epoch, results, state={
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()})
                continue
            record.update(avg_comm_time_pull=record["phase_times"]["pull"],
                          avg_comm_time_push=record["phase_times"]["push"],
                          avg_comm_time=record["phase_times"]["pull"] + record["phase_times"]["push"],
                          avg_server_serve_time=server[0], avg_server_push_wait_time=server[1],
                          avg_server_update_time=server[2], lrs=server[3:], link=link,
                          val_loss=val_loss, val_accuracy=val_accuracy)
            results.add_epoch(record)
            common.checkpoint_epoch(args, ctx, epoch, results)
            common.log(ctx, common.epoch_line(record), rank=1)
            common.warn_if_data_bound(ctx, record, rank=1)
        results.finish()
        common.log(ctx, f"wrote {args.output}", rank=1)
        common.cleanup_distributed(barrier=True)
    finally:
        common.cleanup_distributed()


if __name__ == "__main__":
    common.run_main(main)
