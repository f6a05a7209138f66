"""--target-accuracy: a run stops at the end of the first epoch whose validation reaches the target, on every rank
(the PS's server, which does not train, included), its results written as for a finished run with the time and
steps it took; a resumed run that had already reached it trains no more. On the built-in sample dataset, the
PS on a server and a worker (the same seed: the same accuracies in every run)."""
import json
import subprocess
import sys

import pytest

import targets
from dist_helpers import FAST_ARGS, REPO, run_forked

ARGS = [*FAST_ARGS, "--max-steps", "4", "--lr", "0.05"]


def _run(tmp_path, name, *extra):
    out = tmp_path / name
    proc = run_forked("ps_train.py", *ARGS, *extra, "--output", out, nproc=2, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A: 3 epochs, no target, with checkpoints; B: the same with a target its epoch 1 or 2 reaches; C: A resumed
    for a 4th epoch with that target, already reached."""
    tmp = tmp_path_factory.mktemp("target")
    a = _run(tmp, "a.json", "--epochs", "3", "--resume")
    accs = [e["val_accuracy"] for e in a[1]["epochs"]]
    assert accs[0] < accs[1], accs  # it learns from epoch 1 to 2 (10.0 -> 14.6% here): the stop is not epoch 1's
    goal = max(accs[:2])
    b = _run(tmp, "b.json", "--epochs", "3", "--target-accuracy", str(goal))
    c = _run(tmp, "a.json", "--epochs", "4", "--resume", "--target-accuracy", str(goal))
    return tmp, a, b, c, goal


def test_a_run_stops_at_the_first_validation_that_reaches_the_target(runs):
    tmp, (_, a), (proc, b), _, goal = runs
    assert a["time_to_target"]["target"] is None and a["time_to_target"]["reached"] is None
    first = next(e["epoch"] for e in a["epochs"] if e["val_accuracy"] >= goal)
    assert b["status"] == "complete" and [e["epoch"] for e in b["epochs"]] == list(range(1, first + 1))
    assert [e["val_accuracy"] for e in b["epochs"]] == [e["val_accuracy"] for e in a["epochs"][:first]]
    record = b["time_to_target"]
    assert record["target"] == goal and record["reached"] and record["stopped"] and record["epoch"] == first
    assert record["steps"] == 4 * first and record["val_accuracy"] == b["epochs"][-1]["val_accuracy"]
    assert record["seconds"] == pytest.approx(sum(e["train_time"] for e in b["epochs"]))
    assert f"target {goal:g}% reached" in proc.stdout and f"epoch {first + 1}" not in proc.stdout
    # Every rank stopped there: the run ended (no rank waited in epoch first + 1 for a peer), with the guide's fields.
    check = subprocess.run([sys.executable, "/work/shared/tools/check_results.py", str(tmp / "b.json"), "ps"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_a_resumed_run_that_already_reached_the_target_trains_no_more(runs):
    _, (_, a), _, (proc, c), goal = runs
    assert "no epoch is trained" in proc.stdout and "epoch 4" not in proc.stdout
    assert c["status"] == "complete" and len(c["epochs"]) == 3 and c["all_losses"] == a["all_losses"]
    assert c["time_to_target"]["reached"] and c["time_to_target"]["stopped"]


def test_a_target_is_a_percentage_and_needs_a_meaningful_accuracy():
    for flags, words in ((["--target-accuracy", "120"], "must be a percentage up to 100"),
                         (["--target-accuracy", "50", "--synthetic"], "--target-accuracy means nothing with "
                                                                       "--synthetic")):
        proc = subprocess.run([sys.executable, str(REPO / "ps_train.py"), *flags], capture_output=True, text=True)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr


def test_reach_counts_training_time_and_steps_up_to_the_first_epoch_at_the_target():
    epochs = [{"epoch": 1, "train_time": 2.0, "steps": 5, "val_accuracy": 40.0},
              {"epoch": 2, "train_time": 3.0, "steps": 5, "val_accuracy": 60.0},
              {"epoch": 3, "train_time": 4.0, "steps": 5, "val_accuracy": 55.0}]
    assert targets.reach(epochs, 60.0) == {"epoch": 2, "steps": 10, "seconds": 5.0, "val_accuracy": 60.0}
    assert targets.reach(epochs, 40.0)["seconds"] == 2.0 and targets.reach(epochs, 61.0) is None
    guide = [{k: v for k, v in e.items() if k != "steps"} for e in epochs]
    assert targets.reach(guide, 50.0)["steps"] is None and targets.reach(guide, 50.0, 7)["steps"] == 14
    assert targets.record(epochs, 70.0)["reached"] is False and targets.record(epochs, None)["reached"] is None
