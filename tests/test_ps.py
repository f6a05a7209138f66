"""ps_train.py: the server/worker exchange in real gloo groups, against a single-process reference."""
import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import measure
import ps_train
from dist_helpers import FAST_ARGS, error_lines, run_forked, run_in_group
from sync import ps, ps_async

STEPS = 3
SERVER_RANK = ps.SERVER
COMMS = ("p2p", "collective", "overlap", "pipelined")


def _comms(extra):
    """The transports a case runs with: pipelined updates partition by partition and refuses fp16's scaler."""
    return [c for c in COMMS if not (c == "pipelined" and "fp16" in extra)]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3), nn.BatchNorm2d(6),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


NETS = {"mlp": (_mlp, (8,)), "bn": (_bn_net, (3, 8, 8))}


def _batch(worker, step, shape, poison=None):
    """Worker `worker`'s batch at `step` (different for every worker); `poison` = (worker, step) gets an inf."""
    g = torch.Generator().manual_seed(1000 * worker + step)
    images = 3 * torch.randn(6, *shape, generator=g)
    if poison == (worker, step):
        images[0].fill_(float("inf"))
    return images, torch.randint(0, 4, (6,), generator=g)


def _args(*extra):
    return ps_train.parse_args(["--lr", "0.05", "--momentum", "0.9", "--weight-decay", "0.01", *extra])


class _Issued:
    """Records the point-to-point operations a rank issues on the pipelined transport's group, in issue order."""

    def __init__(self, monkeypatch_dist):
        self.log, self.dist = [], monkeypatch_dist
        self.isend, self.irecv = monkeypatch_dist.isend, monkeypatch_dist.irecv
        monkeypatch_dist.isend = lambda t, dst, group=None, tag=0: self._issue("send", dst, tag, self.isend, t, group)
        monkeypatch_dist.irecv = lambda t, src, group=None, tag=0: self._issue("recv", src, tag, self.irecv, t, group)

    def _issue(self, kind, peer, tag, call, tensor, group):
        self.log.append((kind, peer, tag))
        return call(tensor, peer, group=group, tag=tag)

    def undo(self):
        self.dist.isend, self.dist.irecv = self.isend, self.irecv


def _ps_run(rank, world_size, net, comm, extra, poison):
    """STEPS steps of the PS algorithm as ps_train runs them; returns this rank's parameters and buffers.
    `comm` "sharded-<comm>": every rank trains (as worker rank + 1 of the reference) and owns a shard."""
    import torch.distributed as dist
    make, shape = NETS[net]
    args = _args(*extra)
    ctx = common.DistContext(rank, rank, world_size, world_size, torch.device("cpu"), "gloo", rank == 0)
    model = make()
    sharded = comm.startswith("sharded-")
    comm = comm.replace("sharded-", "")
    # A tiny bucket size so every model spans several buckets (bucket order and hooks are exercised); pipelined
    # merges a small partition with the next tensor, so its partitions need a smaller size for as many.
    layout = ps_train.make_layout(comm, model, 0.0002 if comm == "pipelined" else 0.0005, world_size, sharded)
    assert len(layout.pull) > 2 and len(layout.push) > 2
    trainers = range(world_size) if sharded else range(1, world_size)
    scaler = common.make_scaler(args, ctx)
    owned = layout.owned_params(rank)
    optimizer = common.make_optimizer(args, owned) if owned else None
    issued = _Issued(dist) if comm == "pipelined" else None
    transport = ps_train.make_transport(comm, layout, model, rank, trainers, optimizer)
    if sharded:
        assert {layout.owner[id(p)] for p in model.parameters()} == set(range(world_size))  # every rank serves
    if rank == 0 and not sharded:  # its epoch ends with the trainers' final pull
        ps_train.serve_epoch(transport, optimizer, scaler, lambda step: args.lr, STEPS, 0, 0,
                             measure.StepClock(ctx.device))
        scales = scaler.get_scale()
    else:
        step = ps_train.make_worker_step(model, transport, args, ctx, optimizer if sharded else None, scaler)
        for i in range(STEPS):
            clock = measure.StepClock(ctx.device)
            clock.begin()
            images, targets = _batch(rank + sharded, i, shape, poison)
            step(images, targets, clock, args.lr)
            assert {"pull", "compute", "push"} <= {name for name, _ in clock.steps[-1]}
        transport.end_epoch()  # the workers fetch the final update, as before validation
        scales = None
    if issued:
        issued.undo()
    # On every rank, gradients are views of the push buckets (backward writes straight into what is pushed).
    views = all(p.grad.untyped_storage().data_ptr() == b.flat.untyped_storage().data_ptr()
                and p.grad.stride() == p.stride() for b in layout.grad_buckets for p in b.tensors[:b.grads])
    order = issued and (issued.log, [b.owner for b in layout.push])
    return _arrays(model), scales, views, order


def _reference(world_size, net, extra, poison):
    """Single process: SGD (GradScaler with fp16) applying the mean of every worker's gradient, BN buffers
    averaged the same way."""
    make, shape = NETS[net]
    args = _args(*extra)
    ctx = common.DistContext(0, 0, 1, 1, torch.device("cpu"), "gloo", True)
    model = make()
    optimizer, scaler = common.make_optimizer(args, model.parameters()), common.make_scaler(args, ctx)
    for step in range(STEPS):
        grads, buffers = [], []
        for worker in range(1, world_size):
            replica = copy.deepcopy(model)
            replica.zero_grad(set_to_none=True)
            images, targets = _batch(worker, step, shape, poison)
            with common.autocast(args, ctx):
                loss = nn.CrossEntropyLoss()(replica(images), targets)
            scaler.scale(loss).backward()
            grads.append([p.grad for p in replica.parameters()])
            buffers.append([b.clone() for b in replica.buffers()])
        with torch.no_grad():
            for p, *gs in zip(model.parameters(), *grads):
                p.grad = sum(gs) / (world_size - 1)
            for b, *bs in zip(model.buffers(), *buffers):
                b.copy_(sum(bs) / (world_size - 1))
        scaler.step(optimizer)
        scaler.update()
    return _arrays(model), scaler.get_scale()


def _arrays(model):
    """Parameters then buffers, as numpy arrays (tensors would cross the result queue as shared memory that
    dies with the child)."""
    return [t.detach().numpy().copy() for t in (*model.parameters(), *model.buffers())]


def _all_modes(rank, world_size, cases, sharded=False):
    """For each case, every --comm in turn in one group, then (on rank 0) the reference, in the same 1-thread
    process. `sharded`: the --servers all layout, where every rank trains (the reference has one more worker)."""
    out = {}
    for name, (net, extra, poison) in cases.items():
        runs = {comm: _ps_run(rank, world_size, net, ("sharded-" if sharded else "") + comm, extra, poison)
                for comm in _comms(extra)}
        out[name] = runs, _reference(world_size + sharded, net, extra, poison) if rank == 0 else None
    return out


CASES = {"mlp": ("mlp", [], None), "bn": ("bn", [], None),
         # Worker 2's batch at step 1 overflows: the server skips that update for everyone and halves the scale.
         "fp16": ("mlp", ["--amp", "--amp-dtype", "fp16"], (2, 1))}


@pytest.fixture(scope="module")
def three():
    """Every case in one group of 3 (a server and two workers)."""
    return run_in_group(_all_modes, 3, CASES)


def _check_exact(ranks, case, sharded=False):
    ranks = [r[case] for r in ranks]
    (reference, ref_scale) = ranks[0][1]
    for comm in ranks[0][0]:
        assert sharded or ranks[0][0][comm][1] == ref_scale, comm
        for rank, (runs, _) in enumerate(ranks):
            tensors, _, views, _ = runs[comm]
            assert views, f"--comm {comm}, rank {rank}: a gradient is not a view of its push bucket"
            for i, (got, want) in enumerate(zip(tensors, reference)):
                assert np.array_equal(got, want), f"--comm {comm}, rank {rank}, tensor {i}: differs from the reference"
    return ranks, reference


def _check_issue_order(ranks, case, sharded):
    """pipelined: each pair of ranks issues its matching sends and receives in the same order (NCCL matches them by
    order); every rank issues, each step, the pushes in partition order, then the pulls in reverse."""
    logs = [r[case][0]["pipelined"][3][0] for r in ranks]
    n = len(ranks[0][case][0]["pipelined"][3][1])
    for a, log_a in enumerate(logs):
        for b, log_b in enumerate(logs):
            sent = [tag for kind, peer, tag in log_a if kind == "send" and peer == b]
            assert sent == [tag for kind, peer, tag in log_b if kind == "recv" and peer == a], (a, b)
            assert bool(sent) == (a != b and (sharded or SERVER_RANK in (a, b))), (a, b)  # one server: a star
        tags = [tag for _, _, tag in log_a]
        steps = [t for i, t in enumerate(tags) if i == 0 or t != tags[i - 1]]  # an owner's messages to each peer
        assert steps == STEPS * [*range(n), *(n + p for p in reversed(range(n)))], a


def test_every_transport_equals_single_process_sgd(three):
    ranks, reference = _check_exact(three, "mlp")
    initial = [t.detach().numpy() for t in _mlp().parameters()]
    assert not any(np.array_equal(a, b) for a, b in zip(initial, reference))  # training moved every tensor


def test_batchnorm_buffers_identical_on_every_worker(three):
    ranks, reference = _check_exact(three, "bn")
    # running_mean / running_var / num_batches_tracked of both BatchNorms: averaged, then served back
    buffers = reference[-6:]
    assert buffers[2] == STEPS and not np.array_equal(buffers[0], np.zeros(6))
    _check_issue_order(three, "bn", sharded=False)
    for comm in COMMS:
        worker1, worker2 = ranks[1][0][comm][0], ranks[2][0][comm][0]
        assert all(np.array_equal(a, b) for a, b in zip(worker1[-6:], worker2[-6:])), comm


def test_one_worker():
    _check_exact(run_in_group(_all_modes, 2, {"bn": CASES["bn"]}), "bn")


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_servers_equal_single_process_sgd(world_size):
    """--servers all: every rank trains and owns a shard (optimizer state with it), BatchNorm buffers included;
    the same SGD on the averaged gradient, exactly, for every transport (pipelined: partition by partition, each
    updated by its owner inside the exchange)."""
    ranks = run_in_group(_all_modes, world_size, {"bn": CASES["bn"]}, True)
    reference = ranks[0]["bn"][1][0]
    for comm in COMMS:
        for rank, r in enumerate(ranks):  # every rank ends with the same model, and it is the reference's
            tensors, _, views, _ = r["bn"][0][comm]
            assert views, (comm, rank)
            if comm in ("p2p", "pipelined") or world_size == 2:  # these sum in the trainers' order, as the reference
                assert all(np.array_equal(a, b) for a, b in zip(tensors, reference)), (comm, rank)
            else:  # gloo's reduce adds three gradients in its own order: equal to float rounding
                assert all(np.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(tensors, reference)), (comm, rank)
            assert all(np.array_equal(a, b) for a, b in zip(tensors, ranks[0]["bn"][0][comm][0])), (comm, rank)
    _check_issue_order(ranks, "bn", sharded=True)


def _async_run(rank, world_size, net, serialize):
    """STEPS async steps per worker; `serialize`: the workers take turns, each step (pull, compute, push) alone.
    Returns this rank's final model and, on the server, the staleness of every applied gradient and its version."""
    import torch.distributed as dist
    make, shape = NETS[net]
    args = _args("--mode", "async")
    ctx = common.DistContext(rank, rank, world_size, world_size, torch.device("cpu"), "gloo", rank == 0)
    model = make()
    layout = ps.Layout(model, bucket_mb=0.0005)
    comm, workers = ps_async.Async(layout, rank, world_size - 1), list(range(1, world_size))
    turns = dist.new_group(workers)  # every rank must call new_group
    final = ps.Collective(layout, rank, workers)  # the epoch's end: the newest state to everyone
    if rank == 0:
        optimizer = common.make_optimizer(args, model.parameters())
        staleness = comm.serve(STEPS * len(workers), optimizer, lambda i: args.lr)
        final.pull()
        # The references, in this same 1-thread process (threads change the rounding of a convolution).
        reference = _reference(2, net, [], None)[0] if world_size == 2 else _sequential_reference(world_size, net)
        return _arrays(model), staleness, comm.version, reference
    step, me = ps_train.make_worker_step(model, comm, args, ctx), workers.index(rank)
    for i in range(STEPS):
        if serialize and (i or me):
            dist.recv(torch.zeros(1), src=workers[me - 1], group=turns)
        step(*_batch(rank, i, shape), measure.NoClock())
        if serialize and (i < STEPS - 1 or me < len(workers) - 1):
            dist.send(torch.zeros(1), dst=workers[(me + 1) % len(workers)], group=turns)
    final.pull()
    return _arrays(model), None, None, None


def _sequential_reference(world_size, net):
    """Serialized async: every worker's gradient, in turn, applied at once with lr / workers."""
    make, shape = NETS[net]
    args = _args("--lr", str(0.05 / (world_size - 1)))
    model = make()
    optimizer = common.make_optimizer(args, model.parameters())
    for step in range(STEPS):
        for worker in range(1, world_size):
            optimizer.zero_grad(set_to_none=True)
            images, targets = _batch(worker, step, shape)
            nn.CrossEntropyLoss()(model(images), targets).backward()
            optimizer.step()
    return _arrays(model)


def test_async_with_one_worker_equals_sync():
    ranks = run_in_group(_async_run, 2, "bn", False)
    reference = ranks[0][3]  # synchronous SGD, one worker
    for rank, (tensors, *_) in enumerate(ranks):
        assert all(np.array_equal(a, b) for a, b in zip(tensors, reference)), rank
    assert ranks[0][1] == [0] * STEPS  # one worker is never stale


def test_async_applies_every_gradient_once_and_is_stale_only_when_workers_overlap():
    for serialize in (True, False):
        ranks = run_in_group(_async_run, 3, "mlp", serialize)
        _, staleness, version, reference = ranks[0]
        assert len(staleness) == version == STEPS * 2  # every push applied, exactly once
        assert all(s >= 0 for s in staleness)
        assert all(np.array_equal(a, b) for r in ranks for a, b in zip(r[0], ranks[0][0]))  # all hold the final model
        if serialize:  # each pull right before its own push: nothing in between, and sequential SGD exactly
            assert staleness == [0] * len(staleness)
            assert all(np.array_equal(a, b) for a, b in zip(ranks[0][0], reference))


HOLD = 2.0  # seconds worker 2 holds its gradients back after its PUSH ticket


def _duplex_run(rank, world_size):
    """Worker 2 sends its PUSH ticket, then holds its gradients back for HOLD seconds: the server waits for them. Worker
    1 pulls meanwhile (its first pull), then pushes. Returns the server's staleness and version; worker 1: how long
    its pull took."""
    import time
    import torch.distributed as dist
    make, shape = NETS["mlp"]
    args = _args("--mode", "async")
    ctx = common.DistContext(rank, rank, world_size, world_size, torch.device("cpu"), "gloo", rank == 0)
    model = make()
    layout = ps.Layout(model, bucket_mb=0.0005)
    comm = ps_async.Async(layout, rank, world_size - 1)
    side = dist.new_group([1, 2])  # every rank must call new_group
    if rank == 0:
        optimizer = common.make_optimizer(args, model.parameters())
        return comm.serve(2, optimizer, lambda i: args.lr), comm.version
    if rank == 2:
        ticket = comm._ticket

        def held(what):
            ticket(what)
            if what == ps_async.PUSH:
                dist.send(torch.zeros(1), dst=1, group=side)
                time.sleep(HOLD)

        comm._ticket = held
        ps_train.make_worker_step(model, comm, args, ctx)(*_batch(rank, 0, shape), measure.NoClock())
        return None
    dist.recv(torch.zeros(1), src=2, group=side)
    time.sleep(0.2)  # the server is inside its receive of worker 2's gradients
    start = time.perf_counter()
    comm.pull()
    seconds = time.perf_counter() - start
    comm.layout.zero_grad()
    images, targets = _batch(rank, 0, shape)
    nn.CrossEntropyLoss()(model(images), targets).backward()
    comm.push()
    return seconds


def test_async_server_sends_a_pull_while_it_receives_a_push():
    """Full duplex: a pull is answered while another worker's push is still arriving, with the state as it was
    (the push not yet whole, so not in it: that pull's gradient is then one update stale)."""
    (staleness, version), seconds, _ = run_in_group(_duplex_run, 3)
    assert seconds < HOLD / 2, seconds  # one at a time, it would have waited for worker 2's gradients
    assert staleness == [0, 1] and version == 2


def test_fp16_scaler_skips_an_inf_step_like_gradscaler(three):
    ranks, _ = _check_exact(three, "fp16")
    assert ranks[0][0]["collective"][1] == 65536.0 / 2


def test_a_gradient_set_to_none_is_pushed_from_its_bucket_again():
    """DDP's reducer rule on a worker's layout: after optimizer.zero_grad() (set_to_none) backward's fresh gradients
    are copied into the push buckets, and .grad is the bucket view again (no copy while the views stay)."""
    model = _mlp()
    layout = ps.Layout(model, bucket_mb=0.0005)
    x = torch.randn(5, 8)
    torch.optim.SGD(model.parameters(), lr=0.1).zero_grad()
    model(x).sum().backward()
    fresh = [p.grad.clone() for p in layout.params]
    views = {id(p): v for b in layout.grad_buckets for p, v in zip(b.tensors[:b.grads], b.views)}
    assert len(layout.grad_buckets) > 1 and all(p.grad is views[id(p)] for p in layout.params)
    reference = copy.deepcopy(model)
    reference.zero_grad()
    reference(x).sum().backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(fresh, reference.parameters()))
    layout.zero_grad()
    assert all(b.flat.abs().sum() == 0 for b in layout.grad_buckets)


def test_default_outputs_and_flags(capsys):
    assert ps_train.parse_args([]).output == "results_ps.json"
    assert ps_train.parse_args(["--servers", "all"]).output == "results_ps_sharded.json"
    assert ps_train.parse_args(["--servers", "all", "--comm", "p2p"]).output == "results_ps_p2p_sharded.json"
    assert ps_train.parse_args(["--mode", "async"]).output == "results_ps_async.json"
    for bad in (["--mode", "async", "--comm", "p2p"], ["--mode", "async", "--servers", "all"],
                ["--servers", "all", "--amp", "--amp-dtype", "fp16"], ["--comm", "pipelined", "--amp", "--amp-dtype",
                                                                      "fp16"]):
        with pytest.raises(SystemExit):
            ps_train.parse_args(bad)
        assert capsys.readouterr().err.count("error: ") == 1
    assert ps_train.parse_args(["--comm", "p2p"]).output == "results_ps_p2p.json"
    assert ps_train.parse_args(["--comm", "overlap", "--output", "x.json"]).output == "x.json"
    assert ps_train.parse_args(["--comm", "overlap"]).bucket_mb == 25.0
    assert ps_train.parse_args(["--comm", "pipelined"]).bucket_mb == ps_train.PARTITION_MB
    assert ps_train.parse_args(["--comm", "pipelined", "--bucket-mb", "2"]).bucket_mb == 2.0
    assert ps_train.parse_args(["--servers", "all", "--comm", "pipelined"]).output == \
        "results_ps_pipelined_sharded.json"
    assert ps_train.parse_args(["--channels-last"]).channels_last
    with pytest.raises(SystemExit):
        ps_train.parse_args(["--comm", "p2p", "--channels-last"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --comm p2p") and "contiguous" in lines[0]


def test_world_size_one_is_one_clear_line(tmp_path):
    proc = run_forked("ps_train.py", *FAST_ARGS, "--output", tmp_path / "r.json", cwd=tmp_path)
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "at least 2 processes" in lines[0] and "--nproc_per_node" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_end_to_end_three_processes(tmp_path):
    """A server and two workers, --comm overlap, with the yardstick (one pair) before epoch 1."""
    out = tmp_path / "ps.json"
    proc = run_forked("ps_train.py", *FAST_ARGS, "--max-steps", "3", "--comm", "overlap", "--overhead-pairs", "1",
                      "--output", out, nproc=3, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    # Every field the guide's results_ps.json names.
    assert {"method", "world_size", "num_workers", "batch_size", "epochs", "summary", "all_losses"} <= set(data)
    assert {"epoch", "train_loss", "train_accuracy", "train_time", "train_throughput", "avg_batch_time",
            "avg_comm_time_pull", "avg_comm_time_push", "val_loss", "val_accuracy"} <= set(data["epochs"][0])
    server_times = ("avg_server_serve_time", "avg_server_push_wait_time", "avg_server_update_time")
    assert {"avg_train_throughput", "avg_train_time_per_epoch", "avg_comm_time_pull", "avg_comm_time_push",
            "avg_comm_time", "best_val_accuracy", "scaling_efficiency", *server_times} <= set(data["summary"])
    assert data["status"] == "complete" and data["kind"] == "ps" and data["comm"] == "overlap"
    assert data["num_workers"] == data["trainers"] == 2 and data["world_size"] == 3
    assert data["messages_per_step"] >= 2 and data["state_bytes"] > 4e7  # resnet18: 11M float32 parameters
    epoch = data["epochs"][0]
    assert epoch["images_trained"] == 2 * 3 * 4  # two workers, three steps of batch 4: the server trains none
    assert set(epoch["phase_times"]) == {"data", "pull", "compute", "push"}
    assert epoch["avg_comm_time_pull"] == epoch["phase_times"]["pull"]
    assert epoch["avg_comm_time_push"] == epoch["phase_times"]["push"]
    assert epoch["avg_comm_time"] == epoch["avg_comm_time_pull"] + epoch["avg_comm_time_push"]
    assert all(epoch[key] > 0 for key in server_times) and len(data["all_losses"]) == 3
    assert epoch["lrs"] == [0.01] * 3  # the server's, sent to the workers
    assert 0 <= epoch["val_accuracy"] <= 100 and math.isfinite(epoch["val_loss"])
    overhead = data["comm_overhead"]
    assert overhead["pairs"] == 1 and overhead["run_length"] == 2 and overhead["step_time"] > 0
    assert overhead["local_step_time"] > 0 and "blocking_overhead" in overhead and "hidden_share" in overhead
    assert epoch["scaling_efficiency"] == pytest.approx(
        epoch["train_throughput"] / (2 * 4 / overhead["local_step_time"]))
    # One voice: the epoch summary once (rank 1), the server's statistics once (rank 0).
    assert proc.stdout.count("epoch 1: train loss") == 1 and proc.stdout.count("server epoch 1:") == 1
    assert proc.stdout.count("communication overhead:") == 1


@pytest.mark.parametrize("variant,nproc", [(["--servers", "all"], 2), (["--mode", "async"], 3),
                                           (["--servers", "all", "--comm", "pipelined"], 3),
                                           (["--comm", "pipelined"], 3)],
                         ids=["sharded", "async", "sharded-pipelined", "pipelined"])
def test_end_to_end_sharded_async_and_pipelined(tmp_path, variant, nproc):
    out = tmp_path / "ps.json"
    proc = run_forked("ps_train.py", *FAST_ARGS, "--epochs", "2", "--max-steps", "3", "--overhead-pairs", "1",
                      *variant, "--output", out, nproc=nproc, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["status"] == "complete" and len(data["epochs"]) == 2 and data["comm_overhead"]["pairs"] == 1
    epoch = data["epochs"][-1]
    assert 0 <= epoch["val_accuracy"] <= 100 and set(epoch["phase_times"]) >= {"pull", "compute", "push"}
    if "pipelined" in variant:  # the exchange overlaps forward and backward: its blocking twin measured beside it
        assert data["comm"] == "pipelined" and data["bucket_mb"] == ps_train.PARTITION_MB
        assert "update" not in epoch["phase_times"]  # the owners update inside the exchange
        overhead = data["comm_overhead"]
        assert overhead["run_length"] == 2 and overhead["blocking_overhead"] is not None
        assert "partitions of <= 4 MiB" in proc.stdout
    if variant[0] == "--servers":  # every rank trains: no server clocks
        assert data["servers"] == "all" and data["trainers"] == nproc and epoch["images_trained"] == nproc * 3 * 4
        assert ("update" in epoch["phase_times"]) != ("pipelined" in variant) and "avg_server_update_time" not in epoch
        assert data["largest_shard_bytes"] < data["state_bytes"]
        if "pipelined" in variant:  # whole partitions dealt out by bytes: every shard within 10% of a third
            assert data["largest_shard_bytes"] < 1.1 / 3 * data["state_bytes"]
    elif "pipelined" in variant:  # one server owns every partition: a star of the same messages
        assert data["trainers"] == 2 and epoch["avg_server_update_time"] > 0 and len(epoch["lrs"]) == 3
    else:  # two workers, one server applying 2 x 3 gradients an epoch, each at most a few updates stale
        assert data["mode"] == "async" and data["trainers"] == 2 and epoch["images_trained"] == 2 * 3 * 4
        assert 0 <= epoch["staleness_mean"] <= epoch["staleness_max"] <= 5 and epoch["updates_per_second"] > 0
