"""Runs that survive failures. Under `torchrun --max-restarts`, a killed rank's group is restarted and the scripts
continue from their latest step checkpoint by themselves: a killed run (SIGKILL, mid-epoch) ends with exactly the
parameters and the per-step losses of a run that was never interrupted, for DDP (killed twice: a worker, then rank
0 of the restarted group), the all-reduce, the PS (its server killed) and the sharded, pipelined PS, and records its
restarts. And --resume by hand after the whole job died (every rank at once)."""
import json
import os
import signal

import pytest
import torch

from dist_helpers import FAST_ARGS, Forked, killed_at_exit, rank_pids, run_forked, start_script, wait_until

ARGS = [*FAST_ARGS, "--batch-size", "2", "--max-steps", "6", "--log-every", "1", "--timeout", "1"]
# The sharded PS once, pipelined: each rank restores its own shard and optimizer state as the plain sharded PS does,
# and its exchange left in flight at a checkpoint must be ended first (Method.flush).
# The PS: a server and a worker. --accumulate 2: each of the 12 steps trains 2 micro-batches (the data has 12 a rank).
METHODS = [("baseline_multi_card.py", 2, []), ("all_reduce_train.py", 2, []), ("ps_train.py", 2, []),
           ("ps_train.py", 2, ["--servers", "all", "--comm", "pipelined"]),
           ("all_reduce_train.py", 2, ["--accumulate", "2"])]
IDS = ["ddp", "all_reduce", "ps", "ps_sharded_pipelined", "all_reduce_accumulate"]
# (rank killed, after which step, in which attempt): a checkpoint every 4 steps, so each restart resumes from step 4
# or 8 and redoes 1 to 3 steps. What a restart restores is each method's own (replicas, the server's model and
# optimizer, each owner's shard): one kill each proves it; the second restart (of a restarted group, its rank 0
# killed) is the driver's, the same for every method.
KILLS = {"ddp": [(1, 5, 0), (0, 10, 1)], "all_reduce": [(0, 10, 0)], "ps": [(0, 5, 0)],
         "ps_sharded_pipelined": [(1, 10, 0)], "all_reduce_accumulate": [(1, 5, 0)]}  # steps: optimizer steps


def _start(script, nproc, out, data, *extra, restarts=0):
    return start_script(script, *ARGS, "--data-dir", data, *extra, "--output", out, nproc=nproc, cwd=out.parent,
                        restarts=restarts)


def _uninterrupted(script, nproc, out, data, *extra):
    """The reference: the same run, never interrupted (its ranks forked: what torchrun adds is not its subject)."""
    proc = run_forked(script, *ARGS, "--data-dir", data, *extra, "--output", out, nproc=nproc, cwd=out.parent,
                      timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _progress(out):
    try:
        return int((out.with_name(out.stem + ".ckpt") / "progress").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return -1


def _final_state(out):
    """The model of the last checkpoint (rank 0: DDP and the all-reduce replicas, the PS server, a sharded rank
    after the epoch's final pull)."""
    folder = out.with_name(out.stem + ".ckpt")
    return torch.load(folder / (folder / "latest").read_text() / "rank0.pt", weights_only=True)["state"]["model"]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _folders(tmp_path):
    whole, cut = tmp_path / "whole" / "r.json", tmp_path / "cut" / "r.json"
    whole.parent.mkdir()
    cut.parent.mkdir()
    return whole, cut


@pytest.mark.parametrize("script,nproc,extra,kills", [(*m, KILLS[i]) for m, i in zip(METHODS, IDS)], ids=IDS)
def test_a_killed_run_restarts_by_itself_to_the_same_parameters_and_losses(tmp_path, tiny_data, script, nproc,
                                                                             extra, kills):
    """12 steps in 2 epochs (6 each), a checkpoint every 4 steps; ranks killed as KILLS says."""
    flags = [*extra, "--epochs", "2", "--checkpoint-every", "4"]
    whole, cut = _folders(tmp_path)
    agent = _start(script, nproc, cut, tiny_data, *flags, restarts=2)
    with killed_at_exit(agent):
        for victim, after, attempt in kills:
            target = []

            def reached():
                pid, its_attempt = rank_pids(agent).get(victim, (0, -1))
                target[:] = [pid] if its_attempt == attempt else []
                return _progress(cut) >= after and target

            wait_until(agent, reached, f"step {after} of attempt {attempt}")
            os.kill(target[0], signal.SIGKILL)
        _, err = agent.communicate(timeout=300)
        assert agent.returncode == 0, err[-3000:]
    _uninterrupted(script, nproc, whole, tiny_data, *flags)
    one, two = json.loads(whole.read_text()), json.loads(cut.read_text())
    assert two["status"] == "complete" and [e["epoch"] for e in two["epochs"]] == [1, 2]
    assert two["all_losses"] == one["all_losses"] and len(two["all_losses"]) == 12
    assert _same(_final_state(whole), _final_state(cut))
    restarts = two["restarts"]
    assert [r["attempt"] for r in restarts] == [1, 2][:len(kills)] and "restarts" not in one
    # Each from the last checkpoint before its kill (every 4 steps of the run: 4, 8, 12).
    assert [r["resumed_from_step"] for r in restarts] == [after // 4 * 4 for _, after, _ in kills], restarts
    assert all(1 <= r["steps_redone"] <= 3 and r["seconds_to_first_step"] > 0 for r in restarts), restarts
    assert [e["checkpoints"] for e in one["epochs"]] == [1, 2]  # after steps 4; 8 and 12 (the run's end)
    assert all(e["checkpoint_time"] > 0 for e in one["epochs"])


def test_resume_by_hand_after_the_whole_job_died(tmp_path, tiny_data):
    """Everything killed at once after epoch 1; the same command with --resume continues from the
    checkpoint and ends with the parameters of an uninterrupted run. (DDP: the restart tests above load the
    same checkpoints for every method; this is the other way in, the flag.)"""
    script, nproc, extra = METHODS[0]
    whole, cut = _folders(tmp_path)
    # A long run (the schedule is constant, so its length does not change the math), killed after epoch 1. Its
    # ranks are forked (Forked): torchrun is not the subject here, the flag is.
    run = Forked(script, *ARGS, "--data-dir", tiny_data, *extra, "--epochs", "50", "--resume", "--output", cut,
                 nproc=nproc, cwd=cut.parent)
    latest = cut.with_name("r.ckpt") / "latest"
    with killed_at_exit(run):  # the machine dies: every rank at once (SIGKILL)
        wait_until(run, lambda: latest.exists() and latest.read_text() == "step00000006", "the epoch-1 checkpoint")
    assert json.loads(cut.read_text())["status"] == "incomplete"
    resumed = run_forked(script, *ARGS, "--data-dir", tiny_data, *extra, "--epochs", "2", "--resume", "--output",
                         cut, nproc=nproc, cwd=cut.parent, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _uninterrupted(script, nproc, whole, tiny_data, *extra, "--epochs", "2", "--resume")
    assert "resumed after epoch 1" in resumed.stdout
    assert _same(_final_state(whole), _final_state(cut))
    one, two = json.loads(whole.read_text()), json.loads(cut.read_text())
    assert two["status"] == "complete" and [e["epoch"] for e in two["epochs"]] == [1, 2]
    assert two["resumed_after_epoch"] == [1] and two["all_losses"] == one["all_losses"]
    assert two["epochs"][1]["checkpoint_time"] > 0


def test_a_round_of_the_same_launch_knows_its_checkpoints(tmp_path, monkeypatch):
    """A node's torchrun that restarts its workers only because another node re-joined gives them
    TORCHELASTIC_RESTART_COUNT 0 (seen after a link went down on the emulated cluster): they continue from the
    checkpoints when run.json names this launch (TORCHELASTIC_RUN_ID) under --max-restarts, never another launch's,
    nor under torchrun's default id "none" (the same for every launch)."""
    import checkpoint
    from dist_helpers import cli_args
    args = cli_args(output=str(tmp_path / "r.json"))
    root = checkpoint.folder(args)
    root.mkdir()
    (root / "run.json").write_text(json.dumps({"method": "baseline_ddp", "launch": "job-7"}))
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    assert checkpoint.from_this_launch(args)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-8")
    assert not checkpoint.from_this_launch(args)
    (root / "run.json").write_text(json.dumps({"method": "baseline_ddp", "launch": None}))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert checkpoint.launch() is None and not checkpoint.from_this_launch(args)
    (root / "run.json").write_text(json.dumps({"method": "baseline_ddp", "launch": "job-7"}))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    assert not checkpoint.from_this_launch(args)
