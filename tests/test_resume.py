"""--resume: a run killed after epoch 1 and started again continues from its checkpoint, and ends with exactly
the parameters of a run that was never interrupted; its results file goes on instead of starting over."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dist_helpers import REPO, make_image_folder

ARGS = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "4", "--workers", "0", "--max-steps", "6",
        "--overhead-pairs", "0", "--timeout", "1", "--resume"]
METHODS = [("baseline_multi_card.py", 2), ("all_reduce_train.py", 2), ("ps_train.py", 3)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=2, train_per_class=24, val_per_class=2,
                             size=32)


def _start(script, nproc, epochs, out, data):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={nproc}", str(REPO / script), *ARGS, "--data-dir", str(data),
                             "--epochs", str(epochs), "--output", str(out)], cwd=out.parent, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _kill_tree(pid):
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    os.kill(pid, signal.SIGKILL)
    for child in children:
        _kill_tree(int(child))


def _final_state(out):
    """The model the owner (rank 0: DDP, all-reduce, the PS server) saved with the last checkpoint."""
    folder = out.with_name(out.stem + ".ckpt")
    return torch.load(folder / (folder / "latest").read_text() / "rank0.pt", weights_only=True)["state"]


@pytest.mark.parametrize("script,nproc", METHODS)
def test_a_killed_run_resumes_to_the_same_parameters(tmp_path, data, script, nproc):
    whole = tmp_path / "whole" / "r.json"
    whole.parent.mkdir()
    assert _start(script, nproc, 2, whole, data).wait(timeout=300) == 0
    cut = tmp_path / "cut" / "r.json"
    cut.parent.mkdir()
    # A long run (the schedule is constant, so its length does not change the math), killed after epoch 1.
    proc, latest = _start(script, nproc, 50, cut, data), cut.with_name("r.ckpt") / "latest"
    start = time.time()
    while not (latest.exists() and latest.read_text() == "step00000006"):  # after epoch 1 (6 steps)
        assert proc.poll() is None and time.time() - start < 240, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    _kill_tree(proc.pid)  # the machine dies: torchrun and every rank at once
    proc.wait()
    assert latest.read_text() == "step00000006" and json.loads(cut.read_text())["status"] == "incomplete"
    resumed = _start(script, nproc, 2, cut, data)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    assert "resumed after epoch 1" in stdout
    a, b = _final_state(whole)["model"], _final_state(cut)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    one, two = json.loads(whole.read_text()), json.loads(cut.read_text())
    assert two["status"] == "complete" and [e["epoch"] for e in two["epochs"]] == [1, 2]
    assert two["resumed_after_epoch"] == [1] and two["all_losses"] == one["all_losses"]
    assert two["epochs"][1]["checkpoint_time"] > 0
