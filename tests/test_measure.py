"""measure.py: the epoch loop's counts and reductions, and the communication yardstick, which must measure
what it claims: a known delay injected into every communication call raises each method's overhead by that
much, one process has about none, and the measurement leaves the training state exactly as it was."""
import copy
import statistics
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import all_reduce_train as ar
import baseline_multi_card as ddp_script
import common
import driver
import measure
import ps_train as ps
from data import DataInfo
from dist_helpers import cpu_ctx as _ctx, run_in_group

INFO = DataInfo("test", "/", 3, 0, 0, 8, 1, False)  # 3 classes, 8 px images: the yardstick's batch shape


def _args(*extra):
    return ddp_script.parse_args(["--batch-size", "4", *extra])


# --------------------------------------------------------------------------- the epoch loop
def test_run_epoch_counts_losses_and_phases():
    args = _args("--log-every", "2", "--warmup-steps", "1")
    images, targets = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    losses = iter([torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)])
    seen_lrs = []

    def step(x, y, clock, lr):
        clock.mark("compute")
        seen_lrs.append(lr)
        return next(losses), torch.tensor([[1.0, 0.0]] * 4)  # always predicts class 0: 50% correct

    rec = driver.run_epoch(_ctx(), args, 1, [(images, targets)] * 5, 3, step)  # the loader has more: 3 steps
    assert rec["all_losses"] == [1.0, 2.0, 3.0] and rec["steps"] == 3
    assert rec["train_loss"] == pytest.approx(2.0) and rec["train_accuracy"] == pytest.approx(50.0)
    assert rec["images_trained"] == 12 and rec["warmup_steps"] == 1
    assert set(rec["phase_times"]) == set(rec["phase_times_max"]) == {"data", "compute"}
    assert rec["train_throughput"] > 0 and rec["avg_batch_time"] > 0
    assert rec["lrs"] == seen_lrs == [0.01] * 3


def test_progress_without_a_terminal_is_plain_lines(capsys):
    args = _args("--log-every", "2")
    batch = (torch.randn(2, 3), torch.tensor([0, 1]))
    driver.run_epoch(_ctx(), args, 1, [batch] * 5, 5, lambda x, y, c, lr: (torch.tensor(1.0), torch.zeros(2, 2)))
    out = capsys.readouterr().out
    assert "\r" not in out
    assert [line.split(" loss")[0] for line in out.splitlines()] == [
        "epoch 1 step 2/5", "epoch 1 step 4/5", "epoch 1 step 5/5"]


def _nan_on_rank_1(rank, world_size):
    def step(x, y, clock, lr):
        return torch.tensor(float("nan") if rank == 1 else 1.0), torch.zeros(2, 2)
    try:
        driver.run_epoch(_ctx(rank, world_size), _args("--log-every", "2"), 1,
                          [(torch.randn(2, 3), torch.tensor([0, 1]))] * 4, 4, step)
    except common.UserError as e:
        return str(e)
    return "no error"


def test_a_nan_loss_on_one_rank_stops_every_rank():
    for message in run_in_group(_nan_on_rank_1, 2):
        assert "loss became nan" in message


def _update_on_rank_0_only(rank, world_size):
    def step(x, y, clock, lr):
        clock.mark("compute")
        if rank == 0:  # as a sharded PS rank that owns no tensor never updates (8 ranks of MobileNetV3-small)
            clock.mark("update")
        return torch.tensor(1.0), torch.zeros(2, 2)
    args = _args("--log-every", "2", "--timeout", "0.5")
    return driver.run_epoch(_ctx(rank, world_size), args, 1, [(torch.randn(2, 3), torch.tensor([0, 1]))] * 3, 3,
                             step)["phase_times"]


def test_ranks_with_different_phases_reduce_the_same_ones():
    """A phase one rank never marks counts 0 there; the epoch's reduction used to hang (tensors of unequal length)."""
    for phases in run_in_group(_update_on_rank_0_only, 2, timeout=90):
        assert set(phases) == {"data", "compute", "update"} and phases["update"] >= 0


# --------------------------------------------------------------------------- the yardstick
def test_schedule_alternates_and_times_the_last_of_each_run():
    plan = measure.overhead_schedule(["c", "l"], 2, run_length=2)
    assert plan == [("c", False), ("l", False),
                    ("c", False), ("c", True), ("l", False), ("l", True),
                    ("l", False), ("l", True), ("c", False), ("c", True)]


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 7, 3),
                         nn.BatchNorm2d(7), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(7, 3))


class Delay:
    """A test-only wrapper: sleeps `seconds` in every communication call and counts the calls."""
    CALLS = ("all_reduce", "broadcast", "reduce", "send", "recv", "batch_isend_irecv")

    def __init__(self, seconds):
        self.seconds, self.calls = seconds, 0
        for name in self.CALLS:
            setattr(dist, name, self._wrap(getattr(dist, name)))

    def _wrap(self, call):
        def delayed(*args, **kwargs):
            self.calls += 1
            time.sleep(self.seconds)
            return call(*args, **kwargs)
        return delayed

    def ddp_hook(self, state, bucket):  # DDP's reducer calls the backend directly: delay its buckets here
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        self.calls += 1
        time.sleep(self.seconds)
        return default_hooks.allreduce_hook(state, bucket)


def _state(model, *stateful):
    return ([t.detach().clone() for t in (*model.parameters(), *model.buffers())],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            [copy.deepcopy(s.state_dict()) for s in stateful])


def _same_state(a, b):
    tensors = all(torch.equal(x, y) for x, y in zip(a[0] + [g for g in a[1] if g is not None],
                                                      b[0] + [g for g in b[1] if g is not None]))
    return tensors and [g is None for g in a[1]] == [g is None for g in b[1]] and repr(a[2]) == repr(b[2])


SCRIPTS = {"ddp": (ddp_script, []), "ps-sharded": (ps, ["--servers", "all"]), "ps-async": (ps, ["--mode", "async"]),
           **{f"ar-{m}": (ar, ["--sync", m]) for m in ar.SYNC_MODES},
           **{f"ps-{c}": (ps, ["--comm", c]) for c in ps.COMMS}}


def _yardstick(rank, world_size, name, hook, seconds, pairs=3):
    """Builds method `name` on small_net in this group as its script does, counts the communication calls of one
    step, then measures the overhead without and with `seconds` in every call; returns (plain overhead
    block, delayed block, calls per step, state unchanged by both?) (the blocks are None on the PS server)."""
    ctx = _ctx(rank, world_size)
    script, variant = SCRIPTS[name]
    args = script.parse_args(["--batch-size", "4", "--overhead-pairs", str(pairs), *variant])
    method, extra = script.make_method(args, ctx, INFO, small_net())
    if name == "ddp":
        extra.register_comm_hook(None, hook.ddp_hook)  # DDP's make_method also returns the wrapper
    x, y = measure.fixed_batch(args, INFO, ctx)
    run = lambda: method.step(x, y, measure.NoClock(), 0.01)  # noqa: E731
    run()  # warm-up
    hook.calls = 0
    run()
    calls = hook.calls
    before = _state(method.model, *method.state.values())
    plain = measure.yardstick(args, ctx, INFO, method)
    hook.seconds = seconds
    delayed = measure.yardstick(args, ctx, INFO, method)
    hook.seconds = 0.0
    return plain, delayed, calls, _same_state(before, _state(method.model, *method.state.values()))


def _all(rank, world_size, delays, pairs=3):
    """_yardstick for every method of {method: delay in seconds}, in this group, over `pairs` pairs."""
    hook = Delay(0.0)
    return {method: _yardstick(rank, world_size, method, hook, seconds, pairs) for method, seconds in delays.items()}


# ar-local (local SGD) is left out: its "comm" step communicates on every --local-steps-th step only, so the yardstick's
# median over pairs does not rise by the delay x calls of one step (docs/time_to_accuracy.md)
GROUPS = {2: ("ddp", "ar-overlap", "ar-bucketed", "ar-per-param", "ar-ring", "ps-p2p", "ps-sharded"),
          3: ("ps-collective", "ps-overlap", "ps-async")}


def delay(method):
    """The delay put in every communication call: 20 ms; 5 ms for the point-to-point PS, whose 33 calls a step
    (one a tensor each way) still add 165 ms to each of its steps."""
    return 0.005 if method == "ps-p2p" else 0.02


@pytest.fixture(scope="module")
def yardstick():
    """Every method in one spawn per group size (2 and 3 processes), with and without its delay."""
    return {size: run_in_group(_all, size, {m: delay(m) for m in methods}) for size, methods in GROUPS.items()}


@pytest.mark.alone  # compares times: the other worker waits (conftest.py)
@pytest.mark.parametrize("method", [m for ms in GROUPS.values() for m in ms])
def test_injected_delay_raises_the_overhead_by_its_amount(yardstick, method):
    size = next(s for s, ms in GROUPS.items() if method in ms)
    ranks = [r[method] for r in yardstick[size]]
    assert all(same for *_, same in ranks), "the measurement changed the training state"
    expected = delay(method) * max(calls for _, _, calls, _ in ranks)  # the busiest rank sets the pace
    for rank, (plain, delayed, _, _) in enumerate(ranks):
        if method.startswith("ps") and method != "ps-sharded" and rank == 0:
            assert plain is None and delayed is None  # the server reports nothing: it does not train
            continue
        rise = delayed["overhead"] - plain["overhead"]
        if method == "ps-async":  # workers queue at one server: the rise is at least one worker's own calls
            assert rise > 0.75 * delay(method) * ranks[rank][2], (rank, rise)
            continue
        assert 0.75 * expected - 0.005 < rise < 1.3 * expected + 0.015, (method, rank, rise, expected)
        assert plain["overhead_min"] <= plain["overhead"] <= plain["overhead_max"]
    if method in ("ar-overlap", "ps-overlap"):  # blocking after backward: the same calls, delayed alike
        _, delayed, _, _ = ranks[1]
        rise = delayed["blocking_overhead"] - ranks[1][0]["blocking_overhead"]
        assert 0.75 * expected - 0.005 < rise < 1.3 * expected + 0.015, (method, "blocking", rise, expected)


@pytest.mark.alone  # compares times: the other worker waits (conftest.py)
def test_one_process_has_about_no_overhead():
    # What remains with one process is the method's own bookkeeping (hooks, bucket copies, world-1 collectives):
    # 1.1-3.7 ms on this ~2 ms step on our 2 cores at night (the median of 9 pairs), a quarter of the 20 ms delay per
    # call whose rise test_injected_delay_raises_the_overhead_by_its_amount must see
    out, = run_in_group(_all, 1, {"ddp": 0.0, "ar-overlap": 0.0}, 9)
    for method, (overhead, _, _, same) in out.items():
        assert same
        assert abs(overhead["overhead"]) < max(0.005, 0.15 * overhead["local_step_time"]), (method, overhead)
        # the pairs' spread, for a standard-error rule: 1.2533 x stdev / sqrt(pairs)
        assert overhead["overhead_stdev"] >= 0 and overhead["overhead_se"] == pytest.approx(
            1.2533 * overhead["overhead_stdev"] / overhead["pairs"] ** 0.5, rel=1e-3)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


# --------------------------------------------------------------------------- --profile
def _trace(tmp_path, events):
    path = tmp_path / "trace.json"
    path.write_text(__import__("json").dumps({"traceEvents": events}))
    return path


def test_trace_overlap_on_gpu_kernels_counts_the_overlapped_share(tmp_path):
    """NCCL kernels 0-100 us and 300-400 us; compute kernels 50-150 and 350-360: 60 of 200 us overlapped."""
    k = lambda name, ts, dur: {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "tid": 7}
    path = _trace(tmp_path, [k("ncclDevKernel_AllReduce_Sum_f32", 0, 100), k("ncclKernel_Reduce", 300, 100),
                             k("volta_sgemm", 50, 100), k("elementwise", 350, 10),
                             {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1000, "tid": 1}])
    got = measure.trace_overlap(path)
    assert got["comm_time"] == pytest.approx(200e-6) and got["overlapped_time"] == pytest.approx(60e-6)
    assert got["overlap_share"] == pytest.approx(0.3) and "NCCL" in got["comm_source"]


def test_trace_overlap_on_cpu_uses_gloo_threads_against_the_training_thread(tmp_path):
    op = lambda name, ts, dur, tid: {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "tid": tid}
    path = _trace(tmp_path, [op("gloo:all_reduce", 0, 100, 9), op("aten::conv2d", 80, 40, 1),
                             op("aten::add_", 200, 10, 1), op("aten::relu", 500, 10, 2)])
    got = measure.trace_overlap(path)  # the training thread (most aten ops) overlaps 20 of gloo's 100 us
    assert got["comm_time"] == pytest.approx(100e-6) and got["overlap_share"] == pytest.approx(0.2)


@pytest.mark.parametrize("script,nproc", [("all_reduce_train.py", 2), ("ps_train.py", 3)])
def test_profile_writes_a_trace_and_its_summary(tmp_path, script, nproc):
    from dist_helpers import make_image_folder, run_forked
    import json
    root = make_image_folder(tmp_path / "data", classes=2, train_per_class=16, val_per_class=2, size=16)
    out = tmp_path / "results.json"
    proc = run_forked(script, "--data-dir", root, "--arch", "resnet18", "--image-size", "16", "--batch-size", "4",
                      "--epochs", "1", "--workers", "0", "--overhead-pairs", "0", "--profile", "2",
                      "--output", out, nproc=nproc, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    profile = json.loads(out.read_text())["epochs"][0]["profile"]
    trace = json.loads((tmp_path / "trace_results.json").read_text())
    assert profile["trace"] == str(tmp_path / "trace_results.json") and profile["steps"] == 2
    assert any(e.get("name", "").startswith("gloo:") for e in trace["traceEvents"])
    assert profile["comm_time"] > 0 and 0.0 <= profile["overlap_share"] <= 1.0
    assert "% of it overlapping compute" in proc.stdout
    assert "gpuGetDeviceCount" not in proc.stdout + proc.stderr and "USDT" not in proc.stdout + proc.stderr


# --------------------------------------------------------------------------- the slow rank named
def _run_ddp(tmp_path, name, slow_rank=None):
    """DDP on 3 processes, 28 steps of --synthetic batches; `slow_rank` is slowed from outside as a busy neighbour
    would slow it: stopped (SIGSTOP) for 60 ms of every 90 ms while it runs, so it gets a third of the time."""
    import json
    import os
    import signal
    import threading
    from dist_helpers import FAST_ARGS, Forked
    out = tmp_path / f"{name}.json"
    run = Forked("baseline_multi_card.py", *FAST_ARGS, "--batch-size", "2", "--max-steps", "28", "--synthetic",
                 "--output", out, nproc=3, cwd=tmp_path)
    if slow_rank is not None:
        pid = run.pids[slow_rank]

        def throttle():
            while run.poll() is None:
                for sig, pause in ((signal.SIGSTOP, 0.06), (signal.SIGCONT, 0.03)):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        return
                    time.sleep(pause)
        threading.Thread(target=throttle, daemon=True).start()
    proc = run.wait(timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())["epochs"][0]["rank_compute"], proc.stderr


@pytest.mark.alone  # compares times: the other worker waits (conftest.py)
def test_a_rank_slowed_on_purpose_is_named_and_none_is_without(tmp_path):
    plain, _ = _run_ddp(tmp_path, "plain")
    assert plain["ranks"] == [0, 1, 2] and plain["straggler"] is None, plain
    slowed, _ = _run_ddp(tmp_path, "slowed", slow_rank=2)
    straggler = slowed["straggler"]
    assert straggler is not None and straggler["rank"] == 2 and straggler["ratio"] > 1.3, slowed
    others = [c for r, c in zip(slowed["ranks"], slowed["compute"]) if r != 2]
    assert straggler["cost_per_step"] == pytest.approx(straggler["compute"] - statistics.median(others))


# --------------------------------------------------------------------------- the slow link (issue 36)
def _node_links(rates, stdevs, steps=8, moved=8e6):
    return {"nodes": list(range(len(rates))), "steps": [steps] * len(rates), "rate": rates, "rate_stdev": stdevs,
            "sent_bytes_per_step": [moved] * len(rates), "received_bytes_per_step": [moved] * len(rates),
            "link_time_per_step": [moved / r for r in rates]}


def test_slow_link_names_the_slow_node_beyond_floor_and_noise():
    slow = measure.slow_link(_node_links([100e6, 15e6, 110e6], [20e6, 2e6, 20e6]))
    assert slow["node"] == 1 and slow["ratio"] == pytest.approx(105e6 / 15e6)
    assert slow["cost_per_step"] == pytest.approx(8e6 / 15e6 - 8e6 / 105e6)
    assert measure.slow_link(_node_links([100e6, 90e6, 110e6], [5e6, 5e6, 5e6])) is None  # within the floor
    assert measure.slow_link(_node_links([100e6, 60e6, 110e6], [90e6, 90e6, 90e6])) is None  # within the noise
    assert measure.slow_link(_node_links([100e6], [1e6])) is None


def test_the_report_says_the_slow_link_the_run_named():
    from analysis.links import node_link_words
    rec = _node_links([100e6, 15e6, 110e6], [20e6, 2e6, 20e6])
    rec["slow"] = measure.slow_link(rec)
    words = node_link_words([{"epoch": 1, "node_links": rec}])
    assert words.startswith("node 1's link moved its bytes at 15.0 MB/s, 7.0x slower") and "epoch 1" in words
    rec["slow"] = None
    assert node_link_words([{"epoch": 1, "node_links": rec}]).startswith("no node's link was slower")
    assert node_link_words([{"epoch": 1}]) is None


def test_a_declared_phase_is_timed_on_the_main_thread_only():
    """measure.phase: the clock the owner holds closes `after` on entry and the phase on return; a call on another
    thread (a communication thread) and an owner without a clock record nothing."""
    import threading

    class Room:
        clock = None

        @measure.phase("pull", after="compute")
        def wait(self, seconds):
            time.sleep(seconds)
            return seconds

    room = Room()
    assert room.wait(0.0) == 0.0  # no clock: nothing to time, the result unchanged
    room.clock = measure.StepClock(torch.device("cpu"))
    room.clock.begin()
    time.sleep(0.02)
    assert room.wait(0.03) == 0.03
    other = threading.Thread(target=room.wait, args=(0.0,))
    other.start()
    other.join()
    assert [name for name, _ in room.clock.steps[-1]] == ["begin", "compute", "pull"]
    sums = room.clock.phase_sums()
    assert sums["compute"] >= 0.02 and 0.03 <= sums["pull"] < 0.03 + 0.02
