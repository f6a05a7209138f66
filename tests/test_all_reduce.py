"""all_reduce_train.py: every --sync mode gives DDP's gradients, parameters and buffers in real gloo groups
of 2 and 4 processes (the 4 told they are 2 nodes x 2 for --sync hierarchical), also channels-last, compressed
(as DDP's fp16/bf16 hooks) and under autocast; --sync pipelined updates inside the next forward, in an order every
rank agrees on; what DDP refuses is refused; the hand-written ring on uneven lengths; runs end to end."""
import contextlib
import copy
import json
import math
import threading

import pytest
import torch
import torch.nn as nn

import all_reduce_train as ar
import common
from dist_helpers import FAST_ARGS, run_forked, run_in_group
from sync import allreduce, pipelined_allreduce
from sync.allreduce import ring_all_reduce

TINY_MB = 600 / 2 ** 20  # 600 bytes: less than the largest tensor (conv2 weight, 315 floats = 1260 bytes); 3 buckets
BUCKETED = ("overlap", "bucketed", "ring", "pipelined", "hierarchical")
CONFIGS = [("per-param", 25.0)] + [(mode, mb) for mode in BUCKETED for mb in (25.0, TINY_MB)]
PER_NODE = 2  # --sync hierarchical's processes per node in these groups: 2 processes are 1 node, 4 are 2 nodes x 2
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


def make_sync(model, mode, bucket_mb, compress="none", optimizer=None, scaler=None):
    """Our sync as the script builds it (pipelined owns the update: it gets the optimizer and the scaler)."""
    if mode == "pipelined":
        return pipelined_allreduce.PipelinedSync(model, optimizer, scaler or torch.amp.GradScaler("cpu", enabled=False),
                                                 bucket_mb, compress)
    if mode == "hierarchical":
        return allreduce.HierarchicalSync(model, bucket_mb, compress, local_size=PER_NODE)
    return allreduce.GradSync(model, mode, bucket_mb, compress)


def ours_step(sync, model, opt, x, y, lr=0.1, scaler=None, autocast=None):
    """One step of ours as train_step takes it; returns the buckets launched during backward. Pipelined: the
    update happens in the next forward (or flush), every other mode updates here."""
    sync.begin(lr=lr)
    sync.broadcast_buffers()
    with autocast or contextlib.nullcontext():
        loss = nn.functional.cross_entropy(model(x), y)
    sync.zero_grad()  # in place: autograd accumulates into the buckets
    (scaler.scale(loss) if scaler else loss).backward()
    launched = len(sync.in_flight)
    sync.finish()
    if not sync.pipelined:
        if scaler:
            scaler.step(opt)  # unscales the averaged scaled gradients once, as under DDP
            scaler.update()
        else:
            opt.step()
    return launched


def _match_ddp(rank, world_size, configs, steps=3):
    """For each (mode, bucket_mb): our model + sync against DDP, same start, per-rank different batches. Pipelined:
    a step's gradients are compared after the next forward, which waited for them and applied their update."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    out = {}
    for mode, bucket_mb in configs:
        base = small_model(seed=100 + rank)  # different on each rank: both must take rank 0's
        ours, ddp = copy.deepcopy(base), DDP(copy.deepcopy(base))
        opt_a = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        opt_b = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        sync = make_sync(ours, mode, bucket_mb, optimizer=opt_a)
        grad_err, launched_in_backward, views, in_next_forward, orders, previous = 0.0, [], [], [], [], None
        for step in range(steps):
            x, y = _batch(step, rank)
            if sync.pipelined:
                sync.begin(lr=0.1)
                pending = sync.pending  # the step before's exchange: this forward waits for it and applies it
                untouched = pending is not None and not pending.applied
                sync.broadcast_buffers()
                loss_a = nn.functional.cross_entropy(ours(x), y)
                if pending is not None:
                    in_next_forward.append(untouched and sync.pending is None)
                    grad_err = max(grad_err, _rel_err([p.grad for p in ours.parameters()], previous))
                    orders.append(pending.order)
                sync.zero_grad()
                loss_a.backward()
                sync.finish()
                launched_in_backward.append(0)
            else:
                launched_in_backward.append(ours_step(sync, ours, opt_a, x, y))
            views.append(_views_of_buckets(sync))
            loss_b = nn.functional.cross_entropy(ddp(x), y)
            opt_b.zero_grad(set_to_none=True)
            loss_b.backward()
            grads_b = [p.grad for p in ddp.module.parameters()]
            assert min(g.abs().max().item() for g in grads_b) > 0
            if sync.pipelined:
                previous = [g.clone() for g in grads_b]
            else:
                grad_err = max(grad_err, _rel_err([p.grad for p in ours.parameters()], grads_b))
            opt_b.step()
        if sync.pipelined:  # the last step's exchange, ended by flush
            orders.append(sync.last_order)
            sync.flush()
            grad_err = max(grad_err, _rel_err([p.grad for p in ours.parameters()], previous))
        out[(mode, bucket_mb)] = {
            "grad": grad_err,
            "param": _rel_err(list(ours.parameters()), list(ddp.module.parameters())),
            "buffer": _rel_err(list(ours.buffers()), list(ddp.module.buffers())),
            "buckets": len(sync.buckets),
            "bucket_order": [p for b in sync.buckets for p in b.tensors] == list(ours.parameters())[::-1],
            "launched_in_backward": launched_in_backward,
            "views": views,
            "in_next_forward": in_next_forward,
            "orders": orders,
            "levels": getattr(sync, "levels", None),
        }
        dist.barrier()
    if world_size == 4:  # two levels, compressed
        out["hierarchical", "fp16"] = _match_ddp_compressed(rank, "hierarchical", "fp16")
    ring = {}
    for n in RING_LENGTHS:
        x = torch.randn(n, generator=torch.Generator().manual_seed(n + 17 * rank), dtype=torch.float64)
        expected = x.clone()
        dist.all_reduce(expected)
        ring_all_reduce(x)
        ring[n] = (x - expected).abs().max().item() / expected.abs().max().item()
    return out, ring


@pytest.fixture(scope="module", params=[2, 4], ids=["2 processes", "4 processes"])
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
        if config[0] in ("overlap", "hierarchical"):  # every bucket was launched from hooks while backward still ran
            assert errs["launched_in_backward"] == [errs["buckets"]] * 3, errs
        else:
            assert errs["launched_in_backward"] == [0] * 3, errs
        if config[0] == "hierarchical":  # 4 processes: 2 nodes x 2, two levels; 2 processes: one node, one level
            assert errs["levels"] == (2 if world_size == 4 else 1), errs
        if config[0] == "pipelined":  # each step's update was applied inside the next forward, none before it
            assert errs["in_next_forward"] == [True] * 2, errs
            assert sorted(errs["orders"][0]) == list(range(errs["buckets"])) and len(errs["orders"]) == 3, errs
            assert errs["orders"] == per_rank[0][0][config]["orders"], "every rank exchanged in the same order"


def test_hierarchical_two_levels_compressed_matches_ddp_fp16_hook(group_run):
    """Two levels sum the fp16 shares in another order than gloo's ring, (a+b)+(c+d) against ((a+b)+c)+d: the
    same within a few fp16 units in the last place (2**-10), as far from each other as from no compression."""
    world_size, per_rank = group_run
    for rank, (out, _) in enumerate(per_rank):
        if world_size == 4:
            res = out["hierarchical", "fp16"]
            assert res["grad"] < 4 * 2 ** -10 and res["param"] < 1e-4, (rank, res)
            assert res["gap_to_uncompressed"] > 100 * COMPRESS_TOL, (rank, res)


def test_ring_on_lengths_not_divisible_by_world_size(group_run):
    world_size, per_rank = group_run
    assert any(n % world_size for n in RING_LENGTHS) and min(RING_LENGTHS) < world_size  # some chunks empty
    for rank, (_, ring) in enumerate(per_rank):
        assert max(ring.values()) < 1e-12, (rank, ring)


# --------------------------------------------------------------------------- the rest, in one group of 2
def _match_ddp_amp(rank, amp_dtype, mode):
    """Mixed precision: autocast forward (and, for fp16, a GradScaler) around our sync and around DDP. Pipelined:
    bf16 updates partition by partition in the next forward; fp16 waits for every partition (one inf check)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp_dtype]
    base = small_model(seed=7)
    ours, ddp = copy.deepcopy(base), DDP(copy.deepcopy(base))
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ours, ddp)]
    scalers = [torch.amp.GradScaler("cpu", enabled=amp_dtype == "fp16") for _ in range(2)]
    sync = make_sync(ours, mode, TINY_MB if mode == "pipelined" else 25.0, optimizer=opts[0], scaler=scalers[0])
    for step in range(3):
        x, y = _batch(step, rank)
        ours_step(sync, ours, opts[0], x, y, scaler=scalers[0], autocast=torch.autocast("cpu", dtype=dtype))
        with torch.autocast("cpu", dtype=dtype):
            loss = nn.functional.cross_entropy(ddp(x), y)
        opts[1].zero_grad(set_to_none=True)
        scalers[1].scale(loss).backward()
        scalers[1].step(opts[1])
        scalers[1].update()
    if sync.pipelined:
        sync.flush()
    return (_rel_err(list(ours.parameters()), list(ddp.module.parameters())),
            scalers[0].get_scale() if amp_dtype == "fp16" else None,
            scalers[1].get_scale() if amp_dtype == "fp16" else None)


def _match_ddp_channels_last(rank, mode):
    """Model and input channels-last: after each step every gradient and every momentum buffer has its
    parameter's strides (no silent copy into another layout), and the result equals channels-last DDP's.
    Pipelined: flushed after each step, so its gradients and momenta can be compared there."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    base = small_model(seed=100 + rank).to(memory_format=torch.channels_last)
    ours, ddp = copy.deepcopy(base), DDP(copy.deepcopy(base))
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4) for m in (ours, ddp)]
    sync = make_sync(ours, mode, TINY_MB, optimizer=opts[0])
    strides_kept, grad_err = [], 0.0
    for step in range(2):
        x, y = _batch(step, rank, channels_last=True)
        ours_step(sync, ours, opts[0], x, y)
        if sync.pipelined:
            sync.flush()
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
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ours, hooked, plain)]
    sync = make_sync(ours, mode, TINY_MB, compress, optimizer=opts[0])
    grad_err = grad_gap = 0.0
    for step in range(3):
        x, y = _batch(step, rank)
        ours_step(sync, ours, opts[0], x, y)
        if sync.pipelined:
            sync.flush()
        for model, opt in zip((hooked, plain), opts[1:]):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
        ours_g = [p.grad for p in ours.parameters()]
        grad_err = max(grad_err, _rel_err(ours_g, [p.grad for p in hooked.module.parameters()]))
        grad_gap = max(grad_gap, _rel_err(ours_g, [p.grad for p in plain.module.parameters()]))
        assert all(p.grad.dtype == torch.float32 for p in ours.parameters())
        for opt in opts[1:]:
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
    sync = make_sync(model, mode, TINY_MB, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    sync.begin(lr=0.1)
    sync.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    try:
        sync.finish()
        out["unused"] = None
    except common.UserError as e:
        out["unused"] = str(e)
    model = small_model(0)
    sync = make_sync(model, mode, TINY_MB, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    sync.begin(lr=0.1)
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
    if sync.pipelined:
        sync.flush()
    return out


def _pipelined_priority(rank):
    """One pipelined step whose exchanges are held until backward has ended on every rank: the first exchange's
    readiness vector then says every partition is ready everywhere, so after partition 0 and the one decided with it
    in flight (credit 2: partition 1, the next backward fills), the rest go in the order the next forward needs
    them, the last filled first. 100-byte partitions: 5 of them."""
    model = small_model(0)
    sync = make_sync(model, "pipelined", 100 / 2 ** 20, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    backward_done, exchange = threading.Event(), sync._exchange
    sync._exchange = lambda job: (backward_done.wait(), exchange(job))
    x, y = _batch(0, rank)
    sync.begin(lr=0.1)
    loss = nn.functional.cross_entropy(model(x), y)
    sync.zero_grad()
    loss.backward()
    sync.finish()
    backward_done.set()
    sync.flush()
    return sync.last_order, len(sync.buckets)


def _features(rank, world_size):
    out = {"priority": _pipelined_priority(rank)}
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


def test_pipelined_sends_first_what_the_next_forward_needs_first(features):
    for out in features:
        order, count = out["priority"]
        assert count == 5 and order == [0, 1, 4, 3, 2], out["priority"]


def test_next_partition_is_agreed_from_shared_knowledge_only():
    """Ready everywhere: the one the next forward needs first (highest index); none: the next backward fills."""
    assert pipelined_allreduce.next_partition({0, 1, 2, 3}, set()) == 0
    assert pipelined_allreduce.next_partition({1, 2, 3}, {0, 1, 2}) == 2
    assert pipelined_allreduce.next_partition({3, 4}, {0, 1, 2}) == 3
    assert pipelined_allreduce.next_partition({2, 4}, {0, 1, 2, 3, 4}) == 4


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


def _script_run(folder, *flags):
    """Two processes, two epochs of 3 steps, with the communication yardstick (one pair) before epoch 1."""
    out = folder / "r.json"
    proc = run_forked("all_reduce_train.py", *FAST_ARGS, "--epochs", "2", "--max-steps", "3", "--overhead-pairs",
                      "1", "--output", out, *flags, nproc=2, cwd=folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def overlap_run(tmp_path_factory):
    return _script_run(tmp_path_factory.mktemp("overlap"))


def test_script_end_to_end(overlap_run):
    proc, data = overlap_run
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


def test_pipelined_end_to_end_trains_as_overlap_does(tmp_path, overlap_run):
    """--sync pipelined: the same losses as --sync overlap step by step, and the same validation after each epoch
    (the epoch's last step ends its exchange inside the clock); the yardstick times a step in its steady state
    (runs of 2) and leaves no trace; the phases name the forward's waits (comm) and the per-partition updates."""
    _, overlap = overlap_run
    proc, data = _script_run(tmp_path, "--sync", "pipelined")
    assert data["sync"] == "pipelined" and data["status"] == "complete"
    assert data["all_losses"] == pytest.approx(overlap["all_losses"], rel=1e-5)
    for e, o in zip(data["epochs"], overlap["epochs"]):
        assert e["val_loss"] == pytest.approx(o["val_loss"], rel=1e-5) and e["val_accuracy"] == o["val_accuracy"]
        assert set(e["phase_times"]) == {"data", "buffers", "compute", "comm", "update"}
        assert e["avg_comm_time"] == e["phase_times"]["comm"] >= 0
    overhead = data["comm_overhead"]
    assert overhead["run_length"] == 2 and "hidden_share" in overhead and overhead["step_time"] > 0
    assert "--sync pipelined" in proc.stdout and "readiness vector" in proc.stdout
