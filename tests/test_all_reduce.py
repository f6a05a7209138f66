"""all_reduce_train.py: every --sync mode gives DDP's gradients, parameters and buffers in real gloo groups
of 2 and 3 processes, also channels-last, compressed (as DDP's fp16/bf16 hooks) and under autocast; what DDP
refuses is refused; the hand-written ring on uneven lengths; one run end to end."""
import copy
import json
import math

import pytest
import torch
import torch.nn as nn

import all_reduce_train as ar
import common
from dist_helpers import FAST_ARGS, run_in_group, run_script

TINY_MB = 600 / 2 ** 20  # 600 bytes: less than the largest tensor (conv2 weight, 315 floats = 1260 bytes); 3 buckets
CONFIGS = [("per-param", 25.0)] + [(mode, mb) for mode in ("bucketed", "overlap", "ring") for mb in (25.0, TINY_MB)]
BUCKETED = ("overlap", "bucketed", "ring")
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


def _batch(step, rank, channels_last=False):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x, y = torch.randn(6, 3, 9, 7, generator=g), torch.randint(0, 3, (6,), generator=g)
    return (x.to(memory_format=torch.channels_last) if channels_last else x), y


def _views_of_buckets(sync):
    """Every gradient is a view of its bucket's flat buffer, with its parameter's shape and strides."""
    return all(p.grad.untyped_storage().data_ptr() == b.flat.untyped_storage().data_ptr()
               and p.grad.stride() == p.stride() for b in sync.buckets for p in b.tensors)


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
        grad_err, launched_in_backward, views = 0.0, [], []
        for step in range(steps):
            x, y = _batch(step, rank)
            sync.broadcast_buffers()
            loss_a = nn.functional.cross_entropy(ours(x), y)
            sync.zero_grad()  # in place: autograd accumulates into the buckets
            loss_a.backward()
            launched_in_backward.append(len(sync.in_flight))
            sync.finish()
            views.append(_views_of_buckets(sync))
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
            "bucket_order": [p for b in sync.buckets for p in b.tensors] == list(ours.parameters())[::-1],
            "launched_in_backward": launched_in_backward,
            "views": views,
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
            assert errs["bucket_order"], "buckets hold the parameters in reverse order, as backward produces them"
            assert errs["views"] == [True] * 3, "every .grad stays a view of its bucket (gradient_as_bucket_view)"
        if config[0] == "overlap":  # every bucket was launched from hooks while backward still ran
            assert errs["launched_in_backward"] == [errs["buckets"]] * 3, errs
        else:
            assert errs["launched_in_backward"] == [0] * 3, errs


def test_ring_on_lengths_not_divisible_by_world_size(group_run):
    world_size, per_rank = group_run
    assert any(n % world_size for n in RING_LENGTHS) and min(RING_LENGTHS) < world_size  # some chunks empty
    for rank, (_, ring) in enumerate(per_rank):
        assert max(ring.values()) < 1e-12, (rank, ring)


# --------------------------------------------------------------------------- the rest, in one group of 2
def _match_ddp_amp(rank, amp_dtype, mode):
    """Mixed precision: autocast forward (and, for fp16, a GradScaler) around our sync and around DDP."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp_dtype]
    base = small_model(seed=7)
    ours, ddp = copy.deepcopy(base), DDP(copy.deepcopy(base))
    sync = ar.GradSync(ours, mode, 25.0)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ours, ddp)]
    scalers = [torch.amp.GradScaler("cpu", enabled=amp_dtype == "fp16") for _ in range(2)]
    for step in range(3):
        x, y = _batch(step, rank)
        sync.broadcast_buffers()
        for model, opt, scaler, is_ours in ((ours, opts[0], scalers[0], True), (ddp, opts[1], scalers[1], False)):
            with torch.autocast("cpu", dtype=dtype):
                loss = nn.functional.cross_entropy(model(x), y)
            if is_ours:
                sync.zero_grad()
            else:
                opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if is_ours:
                sync.finish()  # scaled gradients averaged; scaler.step unscales them once, as under DDP
            scaler.step(opt)
            scaler.update()
    return (_rel_err(list(ours.parameters()), list(ddp.module.parameters())),
            scalers[0].get_scale() if amp_dtype == "fp16" else None,
            scalers[1].get_scale() if amp_dtype == "fp16" else None)


def _match_ddp_channels_last(rank, mode):
    """Model and input channels-last: after each step every gradient and every momentum buffer has its
    parameter's strides (no silent copy into another layout), and the result equals channels-last DDP's."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    base = small_model(seed=100 + rank).to(memory_format=torch.channels_last)
    ours, ddp = copy.deepcopy(base), DDP(copy.deepcopy(base))
    sync = ar.GradSync(ours, mode, TINY_MB)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4) for m in (ours, ddp)]
    strides_kept, grad_err = [], 0.0
    for step in range(2):
        x, y = _batch(step, rank, channels_last=True)
        sync.broadcast_buffers()
        loss = nn.functional.cross_entropy(ours(x), y)
        sync.zero_grad()
        loss.backward()
        sync.finish()
        opts[0].step()
        loss = nn.functional.cross_entropy(ddp(x), y)
        opts[1].zero_grad(set_to_none=True)
        loss.backward()
        grad_err = max(grad_err, _rel_err([p.grad for p in ours.parameters()],
                                          [p.grad for p in ddp.module.parameters()]))
        opts[1].step()
        for model, opt in ((ours, opts[0]), (ddp.module, opts[1])):
            strides_kept.append(all(p.grad.stride() == p.stride() == opt.state[p]["momentum_buffer"].stride()
                                    for p in model.parameters()))
    conv = ours[0].weight
    return {"channels_last": conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous(),
            "strides_kept": strides_kept, "grad": grad_err,
            "param": _rel_err(list(ours.parameters()), list(ddp.module.parameters())),
            "buffer": _rel_err(list(ours.buffers()), list(ddp.module.buffers()))}


def _match_ddp_compressed(rank, mode, compress):
    """--compress fp16|bf16 against DDP with torch's fp16_compress_hook / bf16_compress_hook, and how far
    both are from uncompressed DDP (the compression must really happen)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP
    base = small_model(seed=100 + rank)
    ours, hooked, plain = copy.deepcopy(base), DDP(copy.deepcopy(base)), DDP(copy.deepcopy(base))
    hooked.register_comm_hook(None, getattr(default_hooks, f"{compress}_compress_hook"))
    sync = ar.GradSync(ours, mode, TINY_MB, compress)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ours, hooked, plain)]
    grad_err = grad_gap = 0.0
    for step in range(3):
        x, y = _batch(step, rank)
        sync.broadcast_buffers()
        loss = nn.functional.cross_entropy(ours(x), y)
        sync.zero_grad()
        loss.backward()
        sync.finish()
        for model, opt in zip((hooked, plain), opts[1:]):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
        ours_g = [p.grad for p in ours.parameters()]
        grad_err = max(grad_err, _rel_err(ours_g, [p.grad for p in hooked.module.parameters()]))
        grad_gap = max(grad_gap, _rel_err(ours_g, [p.grad for p in plain.module.parameters()]))
        assert all(p.grad.dtype == torch.float32 for p in ours.parameters())
        for opt in opts:
            opt.step()
    return {"grad": grad_err, "gap_to_uncompressed": grad_gap,
            "param": _rel_err(list(ours.parameters()), list(hooked.module.parameters()))}


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = small_model(0)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.body(x)


def _refusals(rank, mode):
    """What DDP (without find_unused_parameters, outside no_sync) refuses: returns the UserError texts."""
    out = {}
    x, y = _batch(0, rank)
    model = WithUnused()
    sync = ar.GradSync(model, mode, TINY_MB)
    sync.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    try:
        sync.finish()
        out["unused"] = None
    except common.UserError as e:
        out["unused"] = str(e)
    model = small_model(0)
    sync = ar.GradSync(model, mode, TINY_MB)
    sync.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward(retain_graph=True)
    try:
        loss.backward()
        out["twice"] = None
    except common.UserError as e:
        out["twice"] = str(e)
    for work, _, _ in sync.in_flight:  # overlap: the first backward's all-reduces, still to be waited for
        work.wait()
    return out


def _features(rank, world_size):
    out = {}
    for amp_dtype in ("bf16", "fp16"):
        for mode in BUCKETED:
            out["amp", amp_dtype, mode] = _match_ddp_amp(rank, amp_dtype, mode)
    for mode in ("per-param", *BUCKETED):
        out["channels_last", mode] = _match_ddp_channels_last(rank, mode)
        out["refusals", mode] = _refusals(rank, mode)
    for compress in ("fp16", "bf16"):
        for mode in BUCKETED:
            out["compress", compress, mode] = _match_ddp_compressed(rank, mode, compress)
    return out


@pytest.fixture(scope="module")
def features():
    return run_in_group(_features, 2)


@pytest.mark.parametrize("amp_dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("mode", BUCKETED)
def test_mixed_precision_matches_ddp(features, amp_dtype, mode):
    for out in features:
        err, our_scale, ddp_scale = out["amp", amp_dtype, mode]
        assert err < TOL, (amp_dtype, mode, err)
        assert our_scale == ddp_scale


@pytest.mark.parametrize("mode", ("per-param", *BUCKETED))
def test_channels_last_keeps_strides_and_matches_ddp(features, mode):
    for rank, out in enumerate(features):
        res = out["channels_last", mode]
        assert res["channels_last"], "the model must really be channels-last for this test to mean anything"
        assert res["strides_kept"] == [True] * 4, (rank, res)  # ours and DDP's, after each of 2 steps
        assert res["grad"] < TOL and res["param"] < TOL and res["buffer"] < TOL, (rank, res)


COMPRESS_TOL = 1e-6  # relative to the largest gradient: the same casts, division and sums as DDP's hook;
# what is left is float32 rounding. Compression itself moves gradients by ~1e-4 (fp16) / ~1e-3 (bf16).


@pytest.mark.parametrize("compress", ["fp16", "bf16"])
@pytest.mark.parametrize("mode", BUCKETED)
def test_compression_matches_ddp_compress_hooks(features, compress, mode):
    for rank, out in enumerate(features):
        res = out["compress", compress, mode]
        assert res["grad"] < COMPRESS_TOL and res["param"] < COMPRESS_TOL, (rank, res)
        assert res["gap_to_uncompressed"] > 100 * COMPRESS_TOL, (rank, res)


@pytest.mark.parametrize("mode", ("per-param", *BUCKETED))
def test_unused_parameter_and_second_backward_are_refused(features, mode):
    for out in features:
        res = out["refusals", mode]
        assert res["unused"] is not None and "unused.weight" in res["unused"], res
        assert "2 parameter(s) got no gradient" in res["unused"] and "find_unused_parameters" in res["unused"]
        assert res["twice"] is not None and "second gradient" in res["twice"], res


# --------------------------------------------------------------------------- command line and end to end
def test_each_non_default_mode_writes_its_own_file():
    assert ar.parse_args([]).output == "results_all_reduce.json"
    assert ar.parse_args(["--sync", "per-param"]).output == "results_all_reduce_per_param.json"
    assert ar.parse_args(["--sync", "ring"]).output == "results_all_reduce_ring.json"
    assert ar.parse_args(["--sync", "ring", "--output", "x.json"]).output == "x.json"
    assert ar.parse_args(["--compress", "bf16"]).compress == "bf16"
    assert ar.SYNC_MODES[0] == "overlap"
    with pytest.raises(SystemExit):
        ar.parse_args(["--bucket-mb", "0"])


def test_compression_needs_buckets(capsys):
    with pytest.raises(SystemExit):
        ar.parse_args(["--sync", "per-param", "--compress", "fp16"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --compress needs buckets")


def test_script_end_to_end(tmp_path):
    """Two processes, two epochs, with the communication yardstick (one pair) before epoch 1."""
    out = tmp_path / "r.json"
    proc = run_script("all_reduce_train.py", *FAST_ARGS, "--epochs", "2", "--max-steps", "3", "--overhead-pairs",
                      "1", "--output", out, nproc=2, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["method"] == "Manual All-Reduce" and data["kind"] == "all_reduce" and data["status"] == "complete"
    assert data["sync"] == "overlap" and data["bucket_mb"] == 25.0 and data["world_size"] == data["trainers"] == 2
    assert data["compress"] == "none" and data["num_buckets"] >= 1
    assert data["wire_bytes_per_step"] == data["gradient_bytes"] > 4e7  # resnet18: 11M float32 gradients
    assert len(data["epochs"]) == 2 and len(data["all_losses"]) == 6
    for e in data["epochs"]:
        for key in ("train_loss", "train_accuracy", "train_time", "train_throughput", "avg_batch_time",
                    "val_loss", "val_accuracy", "avg_comm_time", "scaling_efficiency"):
            assert math.isfinite(e[key]), key
        assert len(e["all_losses"]) == 3 and e["images_trained"] == 3 * 2 * 4 and e["lrs"] == [0.01] * 3
        assert set(e["phase_times"]) == {"data", "buffers", "compute", "comm", "update"}
        assert e["avg_comm_time"] == e["phase_times"]["comm"] and 0 <= e["avg_comm_time"] < e["avg_batch_time"]
    overhead = data["comm_overhead"]
    assert overhead["pairs"] == 1 and overhead["run_length"] == 1 and "definition" in overhead
    assert overhead["step_time"] > 0 and overhead["local_step_time"] > 0
    assert overhead["overhead_min"] <= overhead["overhead"] <= overhead["overhead_max"]
    assert overhead["overhead_share"] == pytest.approx(overhead["overhead"] / overhead["step_time"])
    assert "blocking_overhead" in overhead and "hidden_share" in overhead  # --sync overlap: measured both ways
    first = data["epochs"][0]
    assert first["scaling_efficiency"] == pytest.approx(
        first["train_throughput"] / (2 * 4 / overhead["local_step_time"]))
    for key in ("avg_train_throughput", "avg_train_time_per_epoch", "final_train_accuracy", "best_val_accuracy",
                "avg_comm_time", "scaling_efficiency"):
        assert key in data["summary"], key
    assert "epoch 2: train loss" in proc.stdout and "comm " in proc.stdout
    assert proc.stdout.count("communication overhead:") == 1
