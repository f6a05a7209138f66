"""ps_train.py --server-ranks K: servers of their own (BytePS's placement) against the single-process reference."""
import json

import numpy as np
import pytest
import torch

import common
import measure
import ps_train
from dist_helpers import FAST_ARGS, run_forked, run_in_group
from test_ps import NETS, STEPS, _args, _arrays, _batch, _reference


def _servers_run(rank, world_size, k, order="fill"):
    """STEPS steps with the last k ranks serving (worker rank r as the reference's worker r + 1), BatchNorm included;
    the servers' epoch ends with their shard swap (ps_train's share). Returns this rank's tensors and which ranks own partitions."""
    make, shape = NETS["bn"]
    args = _args("--comm", "pipelined", "--server-ranks", str(k), "--push-order", order)
    ctx = common.DistContext(rank, rank, world_size, world_size, torch.device("cpu"), "gloo", rank == 0)
    model = make()
    where = ps_train.placement(args, world_size)
    layout = ps_train.make_layout("pipelined", model, 0.0002, world_size, False, where["server_ranks"])
    owned = layout.owned_params(rank)
    optimizer = common.make_optimizer(args, owned) if owned else None
    scaler = common.make_scaler(args, ctx)
    transport = ps_train.make_transport("pipelined", layout, model, rank, where["trainer_ranks"], optimizer,
                                        where["server_ranks"], order == "priority")
    if rank in where["server_ranks"]:
        ps_train.serve_epoch(transport, optimizer, scaler, lambda step: args.lr, STEPS, 0, 0,
                             measure.StepClock(ctx.device))
        transport.swap_shards()
    else:
        step = ps_train.make_worker_step(model, transport, args, ctx, None, scaler)
        for i in range(STEPS):
            clock = measure.StepClock(ctx.device)
            clock.begin()
            step(*_batch(rank + 1, i, shape), clock, args.lr)
        transport.end_epoch()
    shard = [sum(4 * p.numel() for p in layout.owned_params(r)) for r in range(world_size)]
    # the reference in the same 1-thread process as the workers (threads change a convolution's rounding)
    return _arrays(model), shard, _reference(world_size - k + 1, "bn", [], None)[0] if rank == 0 else None


@pytest.mark.parametrize("order", ["fill", "priority"])
@pytest.mark.parametrize("world_size,k", [(3, 1), (4, 2), (5, 3), (6, 2)])
def test_server_ranks_equal_single_process_sgd(world_size, k, order):
    """Every rank, workers and servers, ends with the reference's model: SGD (momentum, weight decay) on the mean of
    the workers' gradients, BatchNorm buffers averaged; only the servers own (and balance) the partitions; with
    either push order (--push-order priority: the messages in another order, the same sums)."""
    ranks = run_in_group(_servers_run, world_size, k, order)
    reference = ranks[0][2]
    for rank, (tensors, _, _) in enumerate(ranks):
        assert all(np.array_equal(a, b) for a, b in zip(tensors, reference)), rank
    shard = ranks[0][1]
    assert all(b == 0 for b in shard[:world_size - k]) and all(b > 0 for b in shard[world_size - k:]), shard


def test_server_ranks_flags_and_output():
    assert ps_train.parse_args(["--comm", "pipelined", "--server-ranks", "2"]).output == \
        "results_ps_pipelined_servers2.json"
    for bad in (["--server-ranks", "2"], ["--comm", "pipelined", "--server-ranks", "2", "--servers", "all"],
                ["--server-ranks", "1", "--mode", "async"], ["--comm", "pipelined", "--server-ranks", "0"],
                ["--comm", "pipelined", "--push-order", "priority"]):
        with pytest.raises(SystemExit):
            ps_train.parse_args(bad)
    args = ps_train.parse_args(["--comm", "pipelined", "--server-ranks", "2"])
    assert ps_train.trainers_of(args, 6) == [0, 1, 2, 3]
    assert ps_train.placement(args, 6) == dict(server_ranks=[4, 5], num_servers=2, trainer_ranks=[0, 1, 2, 3],
                                               dedicated_servers=True)


def _server_model(out, rank):
    folder = out.with_name(out.stem + ".ckpt")
    return torch.load(folder / (folder / "latest").read_text() / f"rank{rank}.pt", weights_only=True)["state"]["model"]


def _run(out, data, *extra):
    proc = run_forked("ps_train.py", *FAST_ARGS, "--batch-size", "2", "--max-steps", "3", "--data-dir", data,
                      "--comm", "pipelined", "--server-ranks", "2", "--resume", *extra, "--output", out, nproc=4,
                      cwd=out.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_server_ranks_end_to_end_checkpoint_and_resume(tmp_path, tiny_data):
    """2 workers and 2 servers for 2 epochs, and the same run stopped after epoch 1 and resumed: the same losses,
    validation and servers' models (each server checkpoints its shard's optimizer state and, after the epoch's
    shard swap, the whole model, the same on both)."""
    whole, cut = tmp_path / "whole" / "r.json", tmp_path / "cut" / "r.json"
    whole.parent.mkdir()
    cut.parent.mkdir()
    proc = _run(whole, tiny_data, "--epochs", "2")
    _run(cut, tiny_data, "--epochs", "1")
    assert "resumed after epoch 1" in _run(cut, tiny_data, "--epochs", "2").stdout
    one, two = json.loads(whole.read_text()), json.loads(cut.read_text())
    assert one["placement"] == dict(server_ranks=[2, 3], num_servers=2, trainer_ranks=[0, 1], dedicated_servers=True)
    assert one["server_ranks"] == 2 and one["num_workers"] == 2 and one["world_size"] == 4
    assert one["largest_shard_bytes"] < 0.6 * one["state_bytes"]  # balanced by bytes over the two
    assert "ranks 2-3 only serve" in proc.stdout and proc.stdout.count("server epoch 1:") == 1
    epoch = one["epochs"][-1]
    assert epoch["images_trained"] == 2 * 3 * 2 and len(epoch["lrs"]) == 3 and epoch["avg_server_update_time"] > 0
    assert one["all_losses"] == two["all_losses"] and len(one["all_losses"]) == 6
    assert [e["val_loss"] for e in one["epochs"]] == [e["val_loss"] for e in two["epochs"]]
    a, b = _server_model(whole, 2), _server_model(whole, 3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = _server_model(cut, 2)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_the_link_table_holds_server_nodes_to_the_byteps_bound():
    """4 workers, 4 servers of their own at 1 Gbit/s, 100 MB of state: each worker link 1 x state each way, each
    server link 4 x its quarter; the bound's time max(M/B, nM/(kB)) = 0.8 s against the ring's 1.2 s."""
    from pathlib import Path

    import analysis
    from analysis.links import byteps_bound, link_figures
    data = dict(kind="ps", world_size=8, servers="1", comm="pipelined", mode="sync", state_bytes=1e8,
                largest_shard_bytes=2.5e7, server_ranks=4,
                placement=dict(server_ranks=[4, 5, 6, 7], num_servers=4, trainer_ranks=[0, 1, 2, 3],
                               dedicated_servers=True),
                network=dict(nodes=8, procs_per_node=1, link_rate="1gbit", link_rate_bits=1e9, server_nodes=4),
                epochs=[dict(epoch=1, link=dict(sent_bytes_per_step=1.01e8, received_bytes_per_step=1.0e8))])
    x = analysis.Experiment([analysis.runs.Run(data, Path("r.json"), "ps", "kind")])
    bound = byteps_bound(x)
    assert bound["worker_bytes"] == 1e8 and bound["server_bytes"] == 1e8
    assert bound["seconds"] == pytest.approx(0.8) and bound["ring_seconds"] == pytest.approx(1.2)
    f = link_figures(x)
    assert f.bound_bytes == 1e8 and "servers of their own" in f.bound_how
    data["placement"].update(server_ranks=[4], num_servers=1)
    data["largest_shard_bytes"] = 1e8
    assert byteps_bound(x)["seconds"] == pytest.approx(3.2)  # one server: n x state through its link
