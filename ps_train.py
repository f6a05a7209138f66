"""Parameter server: rank 0 holds the parameters and the optimizer, ranks 1..N-1 compute gradients.

    torchrun --nproc_per_node=4 ps_train.py --epochs 3 --batch-size 64 --workers 16 --data-dir ./ --backend nccl

Synchronous PS (the guide's): each step every worker pulls the parameters, computes gradients on its own shard and
pushes them; the server averages them, takes the optimizer step and serves the result (server_step; the worker's:
make_worker_step). --comm, how pulls and pushes travel (sync/ps.py, ps_pipelined.py):
  p2p         the guide's original: one dist.send / dist.recv per tensor and per worker (a star).
  collective  (default) the guide's improvement: --bucket-mb flat buffers, pull = broadcast from the owner,
              push = reduce(SUM) to it, all buckets in flight at once.
  overlap     collective, BytePS-style: each bucket pushed from the gradient hooks as backward fills it; each
              module's forward waits only for the bucket holding its own tensors.
  pipelined   BytePS's push-sum-pull per partition (<= --bucket-mb, default 4 MiB): pushed point-to-point to its
              owner as backward fills it, updated once its pushes are in, pulled in the next forward's order; the
              step ends with its exchange in flight.
--servers all shards the server: every rank trains and owns a slice of the parameters and optimizer state
(balanced by bytes), so every link carries ~2(N-1)/N of the model per step instead of 2(N-1) models through one
server's link. --server-ranks K (BytePS's placement, --comm pipelined): the last K ranks only serve; a worker's
link carries the model once each way, a server's n x its shard (on the emulated cluster, --cluster NxP+K gives
each server a node of its own). --mode async: one server applies each gradient as it arrives (lr / workers) and
every worker pulls the newest parameters; staleness = server updates between a worker's pull and its push.
BatchNorm: workers push their running statistics with their gradients and the owner serves their mean, so every
worker validates the same model. fp16 (one server, sync, not pipelined): the server owns the GradScaler, unscales
the average once and skips the step on inf/NaN for everyone.
Writes results_ps.json (--comm collective) or results_ps_<comm>[_sharded][_async][_servers<K>].json unless --output
is given.
"""
import torch
import torch.distributed as dist
import torch.nn as nn

import common
import data
import driver
import measure
from modes import DEFAULT_BUCKET_MB, PARTITION_MB, PS_COMMS, PS_MODES, PS_SERVERS, variant_output
from sync.ps import SERVER, P2P, Collective, Layout, Overlap, epoch_fields, exchange_sizes, shard_owners
from sync.ps_async import Async
from sync.ps_pipelined import Partitions, Pipelined
from sync.ps_servers import ServerRanks, placement, share_of, trainers_of
COMMS = PS_COMMS  # the first is the default


def output_name(args):
    suffix = ("_sharded" if args.servers == "all" else "") + ("_async" if args.mode == "async" else "") + \
        (f"_servers{args.server_ranks}" if args.server_ranks else "")
    return variant_output("ps", args.comm, COMMS[0]).replace(".json", suffix + ".json")


def parse_args(argv=None):
    p = common.make_parser(__doc__, output_name)
    p.add_argument("--comm", choices=COMMS, default=COMMS[0], help="how parameters and gradients travel")
    p.add_argument("--bucket-mb", type=common.positive(float), default=None,
                   help=f"flat-buffer size in MiB (default {DEFAULT_BUCKET_MB:g}); --comm pipelined: the partition "
                        f"size (default {PARTITION_MB:g})")
    p.add_argument("--servers", choices=PS_SERVERS, default=PS_SERVERS[0],
                   help="1: rank 0 serves, the others train; all: every rank trains and serves a shard")
    p.add_argument("--mode", choices=PS_MODES, default=PS_MODES[0],
                   help="async: the server applies each gradient as it arrives (one server, its own exchange)")
    p.add_argument("--server-ranks", type=common.positive(int), default=None, metavar="K",
                   help="BytePS's placement: the last K ranks only serve, each a shard of the partitions by bytes, "
                        "the others only train (needs --comm pipelined)")
    p.add_argument("--push-order", choices=("fill", "priority"), default="fill",
                   help="--server-ranks: fill: each partition pushed as backward fills it (BytePS's order); priority: "
                        "one push in flight per server, the partition the next forward needs first (P3's; gloo only)")
    args = common.parse(p, argv)
    if args.bucket_mb is None:
        args.bucket_mb = PARTITION_MB if args.comm == "pipelined" else DEFAULT_BUCKET_MB
    if args.comm == "p2p" and args.channels_last:
        p.error("--comm p2p sends each tensor as it is and needs contiguous tensors (drop --channels-last "
                "or use --comm collective)")
    if args.mode == "async" and (args.servers != "1" or args.comm != COMMS[0]):
        p.error("--mode async has one server and its own exchange, one packed message each way per step "
                "(drop --servers and --comm)")
    if args.accumulate > 1 and args.comm in ("overlap", "pipelined"):
        p.error(f"--accumulate pushes once after the last micro-batch; --comm {args.comm} pushes from backward's "
                "hooks (use --comm collective or p2p)")
    if args.server_ranks and (args.comm != "pipelined" or args.servers != "1" or args.mode != "sync"):
        p.error("--server-ranks places servers of their own on the pipelined transport (use --comm pipelined, "
                "without --servers all or --mode async)")
    if args.push_order != "fill" and not args.server_ranks:
        p.error("--push-order orders the pushes to servers of their own (add --server-ranks K)")
    if args.amp and args.amp_dtype == "fp16" and (args.mode == "async" or args.servers == "all" or
                                                  args.comm == "pipelined"):
        p.error("fp16 loss scaling needs the single synchronous server, checking every gradient before the update "
                "(use --amp-dtype bf16, or one server with --comm collective, p2p or overlap)")
    return args


# --------------------------------------------------------------------------- the guide's worker
def make_worker_step(model, comm, args, ctx, optimizer=None, scaler=None):
    """The guide's worker, one step: pull, forward and backward, push; with --servers all also the update of its
    own shard (`optimizer`). The step the driver runs, with the yardstick's kinds: yardstick_kinds."""
    criterion = nn.CrossEntropyLoss()

    def worker_step(images, targets, clock, lr, via):
        via.clock, via.lr = clock, lr
        via.pull()
        clock.mark("pull")
        micro, losses, outputs = common.micro_batches(images, targets), [], []
        for i, (x, y) in enumerate(micro):  # --accumulate K: K micro-batches' gradients summed, one push
            with common.autocast(args, ctx):
                logits = model(x)  # overlap: each module first waits for its own pull bucket
                loss = criterion(logits, y)
            if i == 0:
                via.finish_pull()
                clock.mark("compute")
                comm.layout.zero_grad()
            (loss * comm.layout.scale / len(micro)).backward()  # overlap: the hooks push as backward fills buckets
            losses.append(loss)
            outputs.append(logits)
        clock.mark("compute")
        loss, logits = (loss, logits) if len(micro) == 1 else common.accumulated(losses, outputs)
        via.push()  # pipelined: returns with the exchange (and the owners' updates) in flight
        clock.mark("push")
        if optimizer is not None and not via.updates_itself:
            update(via, optimizer, scaler, lr)  # --servers all: this rank's own shard
        return loss, logits

    return yardstick_kinds(comm, worker_step, make_local_step(model, comm, args, ctx, criterion))


def yardstick_kinds(comm, worker_step, local_step):
    """The step the driver runs: kind "comm", the worker's step on `comm`; the yardstick's other kinds: "local",
    nothing exchanged (local_step); "blocking", the same buckets exchanged blocking after backward (on
    comm.blocking_twin(): overlap's collective, pipelined's whole exchange after backward)."""
    blocking = comm.blocking_twin() if comm.overlaps else None

    def step(images, targets, clock, lr=None, kind="comm"):
        if kind != "comm":
            comm.flush()  # the other kinds start with nothing in flight
        comm.active = kind == "comm"  # the overlapped transports' hooks stay quiet in the other kinds
        try:
            return local_step(images, targets) if kind == "local" else \
                worker_step(images, targets, clock, lr, blocking if kind == "blocking" else comm)
        finally:
            comm.active = True

    return step


def make_local_step(model, comm, args, ctx, criterion):
    """The yardstick's no-communication step on a worker: the same forward and backward (K micro-batches
    with --accumulate) and an SGD step on every parameter here, with an optimizer of its own."""
    local = {}

    def local_step(images, targets):
        if not local:
            local.update(opt=common.make_optimizer(args, model.parameters()), scaler=common.make_scaler(args, ctx))
        micro, losses, outputs = common.micro_batches(images, targets), [], []
        comm.layout.zero_grad()
        for x, y in micro:
            with common.autocast(args, ctx):
                logits = model(x)
                loss = criterion(logits, y)
            local["scaler"].scale(loss / len(micro)).backward()
            losses.append(loss)
            outputs.append(logits)
        loss, logits = (loss, logits) if len(micro) == 1 else common.accumulated(losses, outputs)
        local["scaler"].step(local["opt"])
        local["scaler"].update()
        return loss, logits

    return local_step


# --------------------------------------------------------------------------- the guide's server
def server_step(comm, optimizer, scaler, lr):
    """The guide's server, one step: serve the parameters, gather the workers' gradients, average them, update;
    each a phase on the clock `comm` holds. A transport with a server of its own (pipelined, async) runs its own."""
    if comm.own_server:
        return comm.serve_step(optimizer, lr)
    serve_pull(comm, scaler)
    gather(comm)
    update(comm, optimizer, scaler, lr)


@measure.phase("serve")
def serve_pull(comm, scaler):
    """The state to every worker's pull, with the server's loss scale (1 without fp16) for their backward."""
    comm.layout.scale.copy_(scaler.scale(torch.ones((), device=comm.layout.scale.device)))
    comm.final_pull()  # the server's side of a whole pull (skipped while the trainers hold this state already)


@measure.phase("push_wait")
def gather(comm):
    """The workers' pushes, summed on the server (its wait includes their forward and backward)."""
    comm.push()


@measure.phase("update")
def update(comm, optimizer, scaler, lr):
    """An owner (the server; --servers all: each rank, its shard): the mean of the pushed sums, one optimizer step
    (fp16: unscaled once, skipped on inf/NaN for everyone)."""
    comm.layout.average(comm.rank, len(comm.trainers))
    common.set_lr(optimizer, lr)
    scaler.step(optimizer)
    scaler.update()


def serve_epoch(comm, optimizer, scaler, lr_at, steps, start, warmup, clock, after_step=None):
    """A server that does not train, one epoch: server_step each step (async: all the epoch's pushes in one call),
    `after_step(done)` after each, then the final pull; its figures per step over the steps after `warmup`."""
    comm.clock = clock  # the phases' clock (measure.phase): serve, push_wait, update, ...
    if comm.asynchronous:
        clock.begin()  # one clock step for the epoch
        comm.serve_epoch(optimizer, lr_at, steps, start, after_step)
        warmup = 0
    else:
        for step in range(start, steps):
            clock.begin()
            server_step(comm, optimizer, scaler, lr_at(step))
            if after_step and step + 1 < steps:
                after_step(step + 1)
    comm.end_serving() if comm.own_server else serve_pull(comm, scaler)  # the epoch's final pull
    return comm.server_figures(clock.phase_sums(skip=warmup), steps - start - warmup, [lr_at(s) for s in range(steps)])


# --------------------------------------------------------------------------- the exchange, the two roles
def make_layout(comm, model, bucket_mb, world_size, sharded, servers=None):
    """The layout of `comm`: pipelined's partitions, or the buckets of the others; sharded over every rank, or
    (pipelined, --server-ranks) over the ranks `servers`."""
    if comm == "pipelined":
        return Partitions(model, bucket_mb, servers or (list(range(world_size)) if sharded else [SERVER]))
    params = [p for p in model.parameters() if p.requires_grad]
    return Layout(model, bucket_mb, shard_owners(params, world_size) if sharded else None)


def make_transport(comm, layout, model, rank, trainers, optimizer=None, servers=None, priority=False):
    if servers:
        return ServerRanks(layout, rank, trainers, servers, model, optimizer, priority)
    if comm == "pipelined":
        return Pipelined(layout, rank, trainers, model, optimizer)
    if comm == "overlap":
        return Overlap(layout, rank, trainers, model)
    return {"p2p": P2P, "collective": Collective}[comm](layout, rank, trainers)


def server_role(args, ctx, comm, optimizer, scaler):
    """A server that does not train (the single one, or one of --server-ranks): it serves the trainers' steps, in
    the yardstick too, and has epochs of its own; the first server logs them."""
    first = next(r for r in range(ctx.world_size) if r not in comm.trainers)

    def step(images, targets, clock, lr, kind="comm"):
        if kind != "local":  # the workers' no-communication step needs no server
            comm.clock = clock
            server_step(comm, optimizer, scaler, lr)

    cold = True  # the process's first epoch (epoch 1, or the first after a restart) leaves out its warm-up

    def epoch_served(epoch, steps, start, after_step):
        nonlocal cold
        warmup, cold = min(args.warmup_steps, steps - start - 1) if cold else 0, False
        stats = serve_epoch(comm, optimizer, scaler, lambda s: common.lr_at(args, epoch - 1 + s / steps), steps,
                            start, warmup, measure.StepClock(ctx.device), after_step)
        common.log(ctx, f"server epoch {epoch}: per step: {stats.describe(args.mode == 'async')}", rank=first)
        return stats

    return dict(step=step, serve_epoch=epoch_served, first_pull=lambda: serve_pull(comm, scaler))


def trainer_role(args, ctx, model, comm, optimizer, scaler, sharded):
    """A worker (or, sharded, a worker that also owns a shard): it trains, and reports the server's figures."""
    def end_of_epoch(clock):  # the epoch's last update, so every trainer validates the same model
        comm.end_epoch()
        clock.mark("pull")

    return dict(step=make_worker_step(model, comm, args, ctx, optimizer if sharded else None, scaler),
                end_of_epoch=end_of_epoch, first_pull=comm.final_pull,  # the results' fields, each epoch:
                figures=lambda record, server: epoch_fields(record, server, len(comm.trainers), args.mode == "async"))


def describe(args, where, layout, state_bytes):
    """The variant in words, for the start-up line."""
    first, last = where["server_ranks"][0], where["server_ranks"][-1]
    who = f"ranks {first}-{last} only serve (--server-ranks {args.server_ranks})" if args.server_ranks else \
        "every rank serves a shard" if args.servers == "all" else "rank 0 serves"
    how = (f" ({len(layout.push)} partitions of <= {args.bucket_mb:g} MiB, each pushed to its owner as backward "
           "fills it, updated once all its pushes are in, pulled in the order the next forward needs it)"
           if args.comm == "pipelined" else "")
    return f"{who}, --comm {args.comm}{how}, --mode {args.mode}, {state_bytes / 1e6:.1f} MB of state"


def make_method(args, ctx, info, model, weights=None):
    """The layout, the transport, this rank's role (server or trainer) and its state, as the driver runs them; and
    what the role's own loop calls (`start`, then a trainer's `end_of_epoch` or a server's `serve_epoch`)."""
    sharded, trainers = args.servers == "all", trainers_of(args, ctx.world_size)
    workers = None if sharded else dist.new_group(ranks=trainers)  # every rank must call new_group
    where = placement(args, ctx.world_size)
    servers = where["server_ranks"] if args.server_ranks else None
    layout = make_layout(args.comm, model, args.bucket_mb, ctx.world_size, sharded, servers)
    owned = layout.owned_params(ctx.rank)
    optimizer = common.make_optimizer(args, owned) if owned else None
    scaler = common.make_scaler(args, ctx)
    comm = Async(layout, ctx.rank, len(trainers)) if args.mode == "async" else \
        make_transport(args.comm, layout, model, ctx.rank, trainers, optimizer, servers,
                       args.push_order == "priority")
    role = trainer_role(args, ctx, model, comm, optimizer, scaler, sharded) if ctx.rank in trainers else \
        server_role(args, ctx, comm, optimizer, scaler)
    share = None if sharded else share_of(ctx, info.steps, where, comm)
    step, figures, first_pull = role.pop("step"), role.pop("figures", lambda *_: {}), role.pop("first_pull")
    role["start"] = lambda: (first_pull(), share and share.reset())  # the link counters start after the first pull
    sizes = exchange_sizes(layout, comm, args, ctx.world_size)  # state, largest shard, gradients, messages
    return driver.Method(
        kind="ps", description=describe(args, where, layout, sizes["state_bytes"]),
        settings=dict(comm=args.comm, servers=args.servers, mode=args.mode, bucket_mb=args.bucket_mb,
                      server_ranks=args.server_ranks),
        model=model, step=step, trainers=trainers, group=workers, replicated=False, overlaps=comm.overlaps,
        run_length=2,  # a pull waits for the server's update of the step before: runs of 2 in the yardstick
        flush=comm.flush,  # pipelined: a step leaves its exchange in flight (the others: nothing to do)
        state={"model": model, "optimizer": optimizer, "scaler": scaler,
               **({"async": comm} if args.mode == "async" else {})} if owned else {},
        figures=lambda record, served: figures(record, share(served) if share else None),  # every rank: shared first
        fields=dict(weights=weights, num_workers=len(trainers), placement=where, **sizes)), role


# --------------------------------------------------------------------------- the loops
def train(run, worker_step, end_of_epoch):
    """A worker's training loop (the guide's worker): on each batch, forward and backward, push the gradients,
    pull the new parameters (driver.Run keeps the rest: resume or yardstick, validation, checkpoints, results;
    driver.Epoch the clock, the sums, the learning rate)."""
    for epoch in run.epochs():
        steps = run.steps()  # this epoch's batches on this worker's shard, its clock and learning rate
        for images, targets in steps:
            loss, logits = worker_step(images, targets, steps.clock, steps.lr)  # push, the servers' update, pull
            steps.count(loss, logits, targets)  # the loss and accuracy sums, --log-every, --checkpoint-every
        end_of_epoch(steps.clock)  # the epoch's last update pulled: every worker validates the same model
        run.end_epoch(steps.finish())  # validation, link counters, checkpoint, results, the epoch line


def serve(run, serve_epoch):
    """A server's loop (the guide's server; ranks that only serve): each epoch, the workers' steps served."""
    for epoch in run.epochs():
        run.end_epoch(served=serve_epoch(epoch, run.info.steps, run.first_step, run.after_step))


def main(argv=None):
    args = parse_args(argv)
    with driver.session(args) as ctx:
        # The trainers shard the training set among themselves (trainers_of: a user error if none or no server).
        ds = data.open_data(args, ctx, len(trainers_of(args, ctx.world_size)))
        model, weights = common.build_model(args, ctx, ds.info.num_classes)
        method, role = make_method(args, ctx, ds.info, model, weights)
        with driver.Run(args, ctx, ds, method) as run:
            role["start"]()  # the first pull: the trainers get the servers' state (a resumed run's too)
            if run.trains:
                train(run, method.step, role["end_of_epoch"])
            else:
                serve(run, role["serve_epoch"])


if __name__ == "__main__":
    common.run_main(main)
