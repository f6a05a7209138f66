"""--accumulate K and --sync local, in real gloo groups, against DDP itself: the kit's own steps (all_reduce_train's
per mode, the PS worker's on the collective transport) given K micro-batches match DDP's no_sync() accumulation
of the same micro-batches (loss / K) to 1e-6; local SGD with H = 1 matches DDP's parameters with momentum and
weight decay (SGD is linear in the gradient), and with H > 1 every rank holds the same model after each average;
a script run with --accumulate 2 trains every micro-batch and counts optimizer steps."""
import json

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import all_reduce_train
import common
import measure
import ps_train
from dist_helpers import FAST_ARGS, run_forked, run_in_group, run_script

K, STEPS, TOL = 4, 3, 1e-6
FLAGS = ["--lr", "0.05", "--momentum", "0.9", "--weight-decay", "0.01", "--bucket-mb", "0.0005"]
AR_CASES = (("per-param", "comm"), ("bucketed", "comm"), ("overlap", "comm"), ("overlap", "blocking"),
            ("ring", "comm"))


def _net(bn=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8) if bn else nn.Identity(), nn.ReLU(), nn.Linear(8, 8),
                         nn.ReLU(), nn.Linear(8, 3))


def _micro(worker, step):
    """Worker `worker`'s K micro-batches of step `step` (different on every worker)."""
    g = torch.Generator().manual_seed(100 * worker + step)
    return [torch.randn(5, 6, generator=g) for _ in range(K)], [torch.randint(0, 3, (5,), generator=g)
                                                                for _ in range(K)]


def _ddp(worker, group, bn, micro=K, steps=STEPS):
    """DDP with nanoGPT's accumulation: no_sync() for the first K-1 micro-batches, each loss / K."""
    model = DDP(_net(bn), process_group=group)
    args = all_reduce_train.parse_args(FLAGS)
    optimizer = common.make_optimizer(args, model.parameters())
    for step in range(steps):
        optimizer.zero_grad()
        xs, ys = _micro(worker, step)
        for i, (x, y) in enumerate(zip(xs[:micro], ys[:micro])):
            with model.no_sync() if i + 1 < micro else contextlib_null():
                (nn.CrossEntropyLoss()(model(x), y) / micro).backward()
        optimizer.step()
    return [t.detach().clone() for t in (*model.module.parameters(), *model.module.buffers())]


def contextlib_null():
    import contextlib
    return contextlib.nullcontext()


def _ours(rank, world_size, mode, kind, accumulate=K, steps=STEPS, extra=()):
    args = all_reduce_train.parse_args([*FLAGS, "--sync", mode, "--accumulate", str(accumulate), *extra])
    ctx = common.DistContext(rank, rank, world_size, world_size, torch.device("cpu"), "gloo", rank == 0)
    model = _net(bn=mode != "local")
    optimizer = common.make_optimizer(args, model.parameters())
    scaler = common.make_scaler(args, ctx)
    sync = all_reduce_train.make_sync(model, args, ctx, optimizer, scaler)
    step = all_reduce_train.make_train_step(model, sync, optimizer, scaler, args, ctx)
    for i in range(steps):
        clock = measure.StepClock(ctx.device)
        clock.begin()
        xs, ys = _micro(rank, i)
        loss, logits = step(xs, ys, clock, args.lr, kind) if accumulate > 1 else step(xs[0], ys[0], clock, args.lr,
                                                                                      kind)
        assert logits.shape[0] == 5 * accumulate
    return [t.detach().clone() for t in (*model.parameters(), *model.buffers())]


def _err(ours, ref):
    scale = max(t.abs().max().item() for t in ref)
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(ours, ref)) / scale


def _all_reduce_cases(rank, world_size):
    ref = _ddp(rank, None, bn=True)
    errors = {f"{mode}/{kind}": _err(_ours(rank, world_size, mode, kind), ref) for mode, kind in AR_CASES}
    # local SGD, H = 1, no accumulation: DDP's parameters (BatchNorm-free: its buffers are averaged, not rank 0's)
    ref = _ddp(rank, None, bn=False, micro=1, steps=5)
    errors["local H=1"] = _err(_ours(rank, world_size, "local", "comm", 1, 5, ["--local-steps", "1"]), ref)
    h2 = _ours(rank, world_size, "local", "comm", 1, 4, ["--local-steps", "2"])
    gathered = [None] * world_size
    dist.all_gather_object(gathered, [t.numpy() for t in h2])
    errors["local H=2 ranks agree"] = max(abs(a - b).max() for a, b in zip(gathered[0], gathered[-1]))
    errors["local H=2 differs from H=1"] = -_err(h2, ref)  # negative: must be a real difference
    return errors


def test_accumulate_and_local_sgd_match_ddp():
    for errors in run_in_group(_all_reduce_cases, 2):
        for case, err in errors.items():
            if case.endswith("differs from H=1"):
                assert -err > 1e-4, (case, -err)
            else:
                assert err < TOL, (case, err)


def _ps_case(rank, world_size):
    """Ranks 1..N-1 train the single-server PS (collective) with --accumulate K; then DDP on those ranks alone."""
    args = ps_train.parse_args([*FLAGS, "--accumulate", str(K)])
    ctx = common.DistContext(rank, rank, world_size, world_size, torch.device("cpu"), "gloo", rank == 0)
    model, trainers = _net(bn=False), list(range(1, world_size))
    workers = dist.new_group(ranks=trainers)
    layout = ps_train.make_layout("collective", model, args.bucket_mb, world_size, False)
    owned = layout.owned_params(rank)
    optimizer = common.make_optimizer(args, owned) if owned else None
    scaler = common.make_scaler(args, ctx)
    comm = ps_train.make_transport("collective", layout, model, rank, trainers)
    if rank == 0:
        ps_train.serve_epoch(comm, optimizer, scaler, lambda s: args.lr, STEPS, 0, 0, measure.StepClock(ctx.device))
        return None
    step = ps_train.make_worker_step(model, comm, args, ctx, None, scaler)
    for i in range(STEPS):
        clock = measure.StepClock(ctx.device)
        clock.begin()
        step(*_micro(rank, i), clock, args.lr)
    comm.end_epoch()
    ours = [t.detach().clone() for t in model.parameters()]
    return _err(ours, _ddp(rank, workers, bn=False)[:len(ours)])


def test_ps_accumulate_matches_ddp():
    for err in run_in_group(_ps_case, 3)[1:]:
        assert err < TOL


@pytest.mark.parametrize("script,nproc", [("all_reduce_train.py", 2), ("baseline_multi_card.py", 2),
                                         ("ps_train.py", 3)])
def test_script_accumulate_counts_micro_batches(tmp_path, script, nproc):
    """2 optimizer steps of 2 micro-batches of 4 images on each of 2 trainers (the PS: a server and 2 workers)."""
    out = tmp_path / "r.json"
    proc = run_forked(script, *FAST_ARGS, "--max-steps", "2", "--accumulate", "2", "--overhead-pairs", "1",
                      "--output", out, nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    epoch = data["epochs"][0]
    assert epoch["steps"] == 2 and epoch["images_trained"] == 2 * 2 * 4 * 2  # steps x K x batch x ranks
    assert data["args"]["accumulate"] == 2 and data["comm_overhead"]["step_time"] > 0
    if script != "all_reduce_train.py":
        return
    proc = run_script(script, *FAST_ARGS, "--accumulate", "1000", "--output", tmp_path / "x.json",
                      nproc=2, timeout=120)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(ours) == 1 and "--accumulate 1000 needs 1000 micro-batches" in ours[0]
