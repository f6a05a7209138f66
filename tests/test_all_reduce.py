"""all_reduce_train.py: every --sync mode gives DDP's gradients, parameters and buffers in real gloo groups
of 2 and 3 processes; the hand-written ring on uneven lengths; the bucket layout; one run end to end."""
import copy
import json
import math

import pytest
import torch
import torch.nn as nn

import all_reduce_train as ar
from dist_helpers import FAST_ARGS, run_in_group, run_script

TINY_MB = 600 / 2 ** 20  # 600 bytes: less than the largest tensor (conv2 weight, 315 floats = 1260 bytes); 3 buckets
CONFIGS = [("per-param", 25.0)] + [(mode, mb) for mode in ("bucketed", "overlap", "ring") for mb in (25.0, TINY_MB)]
RING_LENGTHS = [1, 2, 3, 5, 7, 10, 1001]
TOL = 1e-6  # relative to the largest gradient (or parameter) magnitude


def small_model(seed):
    """Conv + BatchNorm with odd sizes (5, 7 and 3 channels, 3x3 kernels), seeded differently per rank."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                         nn.Conv2d(5, 7, 3), nn.BatchNorm2d(7), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(7, 3))


def _rel_err(ours, ref):
    scale = max(t.abs().max().item() for t in ref)
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(ours, ref)) / max(scale, 1e-12)


def _match_ddp(rank, world_size, configs, steps=3):
    """For each (mode, bucket_mb): our model + GradSync against DDP, same start, per-rank different batches."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    out = {}
    for mode, bucket_mb in configs:
        base = small_model(seed=100 + rank)  # different on each rank: both must take rank 0's
        ours, ddp = copy.deepcopy(base), DDP(copy.deepcopy(base))
        sync = ar.GradSync(ours, mode, bucket_mb)
        opt_a = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        opt_b = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        grad_err, launched_in_backward = 0.0, []
        for step in range(steps):
            g = torch.Generator().manual_seed(1000 * step + rank)
            x, y = torch.randn(6, 3, 9, 7, generator=g), torch.randint(0, 3, (6,), generator=g)
            sync.broadcast_buffers()
            loss_a = nn.functional.cross_entropy(ours(x), y)
            opt_a.zero_grad(set_to_none=step % 2 == 0)  # odd steps: autograd accumulates into the buckets
            loss_a.backward()
            launched_in_backward.append(sync.launched)
            sync.finish()
            loss_b = nn.functional.cross_entropy(ddp(x), y)
            opt_b.zero_grad(set_to_none=True)
            loss_b.backward()
            grads_b = [p.grad for p in ddp.module.parameters()]
            assert min(g.abs().max().item() for g in grads_b) > 0
            grad_err = max(grad_err, _rel_err([p.grad for p in ours.parameters()], grads_b))
            opt_a.step()
            opt_b.step()
        out[(mode, bucket_mb)] = {
            "grad": grad_err,
            "param": _rel_err(list(ours.parameters()), list(ddp.module.parameters())),
            "buffer": _rel_err(list(ours.buffers()), list(ddp.module.buffers())),
            "buckets": len(sync.buckets),
            "launched_in_backward": launched_in_backward,
        }
        dist.barrier()
    ring = {}
    for n in RING_LENGTHS:
        x = torch.randn(n, generator=torch.Generator().manual_seed(n + 17 * rank), dtype=torch.float64)
        expected = x.clone()
        dist.all_reduce(expected)
        ar.ring_all_reduce(x)
        ring[n] = (x - expected).abs().max().item() / expected.abs().max().item()
    return out, ring


@pytest.fixture(scope="module", params=[2, 3], ids=["2 processes", "3 processes"])
def group_run(request):
    return request.param, run_in_group(_match_ddp, request.param, CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=[f"{m}-{'tiny' if mb < 1 else '25MiB'}" for m, mb in CONFIGS])
def test_every_mode_matches_ddp(group_run, config):
    """Gradients each step, then parameters and BatchNorm buffers after 3 SGD steps, equal DDP's on every rank."""
    world_size, per_rank = group_run
    for rank, (out, _) in enumerate(per_rank):
        errs = out[config]
        assert errs["grad"] < TOL, (rank, errs)
        assert errs["param"] < TOL, (rank, errs)
        assert errs["buffer"] < TOL, (rank, errs)
        if config[0] != "per-param":
            assert errs["buckets"] == (1 if config[1] == 25.0 else 3), errs
        if config[0] == "overlap":  # every bucket was launched from hooks while backward still ran
            assert errs["launched_in_backward"] == [errs["buckets"]] * 3, errs


def test_ring_on_lengths_not_divisible_by_world_size(group_run):
    world_size, per_rank = group_run
    assert any(n % world_size for n in RING_LENGTHS) and min(RING_LENGTHS) < world_size  # some chunks empty
    for rank, (_, ring) in enumerate(per_rank):
        assert max(ring.values()) < 1e-12, (rank, ring)


def test_buckets_reverse_order_capped_and_split_by_dtype():
    params = [nn.Parameter(torch.zeros(n)) for n in (10, 300, 7, 7, 100)] + [nn.Parameter(torch.zeros(3).double())]
    buckets = ar.make_buckets(params, bucket_bytes=4 * 120)
    assert [[p.numel() for p in b] for b in buckets] == [[3], [100, 7, 7], [300], [10]]
    assert [p for b in buckets for p in b] == params[::-1]
    assert len(ar.make_buckets(params, 25 * 2 ** 20)) == 2  # float64 and float32 never share a bucket


def test_busy_time_is_the_union_of_intervals():
    assert ar.busy_time([]) == 0.0
    assert ar.busy_time([(0, 2), (1, 3), (5, 6)]) == pytest.approx(4.0)
    assert ar.busy_time([(4, 5), (0, 10)]) == pytest.approx(10.0)


def test_each_non_default_mode_writes_its_own_file():
    assert ar.parse_args([]).output == "results_all_reduce.json"
    assert ar.parse_args(["--sync", "per-param"]).output == "results_all_reduce_per_param.json"
    assert ar.parse_args(["--sync", "ring"]).output == "results_all_reduce_ring.json"
    assert ar.parse_args(["--sync", "ring", "--output", "x.json"]).output == "x.json"
    with pytest.raises(SystemExit):
        ar.parse_args(["--bucket-mb", "0"])


def test_script_end_to_end(tmp_path):
    out = tmp_path / "r.json"
    proc = run_script("all_reduce_train.py", *FAST_ARGS, "--epochs", "2", "--max-steps", "3", "--output", out,
                      nproc=2, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["method"] == "Manual All-Reduce" and data["kind"] == "all_reduce" and data["status"] == "complete"
    assert data["sync"] == "overlap" and data["bucket_mb"] == 25.0 and data["world_size"] == 2
    assert len(data["epochs"]) == 2 and len(data["all_losses"]) == 6
    for e in data["epochs"]:
        for key in ("train_loss", "train_accuracy", "train_time", "train_throughput", "avg_batch_time",
                    "val_loss", "val_accuracy", "avg_comm_time", "avg_comm_op_time"):
            assert math.isfinite(e[key]), key
        assert len(e["all_losses"]) == 3 and e["images_trained"] == 3 * 2 * 4
        assert 0 <= e["avg_comm_time"] < e["avg_batch_time"] and 0 < e["avg_comm_op_time"] < e["avg_batch_time"]
    for key in ("avg_train_throughput", "avg_train_time_per_epoch", "final_train_accuracy", "best_val_accuracy",
                "avg_comm_time", "avg_comm_op_time"):
        assert key in data["summary"], key
    assert "epoch 2: train loss" in proc.stdout and "comm " in proc.stdout


def _match_ddp_amp(rank, world_size, amp_dtype, modes):
    """Mixed precision: autocast forward (and, for fp16, a GradScaler) around our sync and around DDP."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp_dtype]
    out = {}
    for mode in modes:
        base = small_model(seed=7)
        ours, ddp = copy.deepcopy(base), DDP(copy.deepcopy(base))
        sync = ar.GradSync(ours, mode, 25.0)
        opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ours, ddp)]
        scalers = [torch.amp.GradScaler("cpu", enabled=amp_dtype == "fp16") for _ in range(2)]
        for step in range(3):
            g = torch.Generator().manual_seed(1000 * step + rank)
            x, y = torch.randn(6, 3, 9, 7, generator=g), torch.randint(0, 3, (6,), generator=g)
            sync.broadcast_buffers()
            for model, opt, scaler, is_ours in ((ours, opts[0], scalers[0], True), (ddp, opts[1], scalers[1], False)):
                with torch.autocast("cpu", dtype=dtype):
                    loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if is_ours:
                    sync.finish()  # scaled gradients averaged; scaler.step unscales them once, as under DDP
                scaler.step(opt)
                scaler.update()
        out[mode] = (_rel_err(list(ours.parameters()), list(ddp.module.parameters())),
                     scalers[0].get_scale() if amp_dtype == "fp16" else None,
                     scalers[1].get_scale() if amp_dtype == "fp16" else None)
    return out


@pytest.mark.parametrize("amp_dtype", ["bf16", "fp16"])
def test_mixed_precision_matches_ddp(amp_dtype):
    modes = ("overlap", "bucketed", "ring")
    for out in run_in_group(_match_ddp_amp, 2, amp_dtype, modes):
        for mode in modes:
            err, our_scale, ddp_scale = out[mode]
            assert err < TOL, (amp_dtype, mode, err)
            assert our_scale == ddp_scale
