"""Faults and scale-out with real processes: a killed, stopped or interrupted rank never hangs the run nor
loses finished epochs; two torchrun agents (two simulated nodes) train exactly like one."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dist_helpers import REPO, free_port, make_image_folder

TINY = ["--arch", "resnet18", "--image-size", "16", "--batch-size", "2", "--workers", "0"]
OWN = {"baseline_multi_card.py": ["--calib-steps", "0"], "all_reduce_train.py": [], "ps_train.py": []}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=2, train_per_class=24, val_per_class=2,
                             size=16)


def _torchrun(script, nproc, args, cwd, *, nnodes=1, node_rank=0, port=None):
    launch = ["--standalone"] if nnodes == 1 else [
        f"--nnodes={nnodes}", f"--node_rank={node_rank}", "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=kit-test"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, f"--nproc_per_node={nproc}",
           "--max_restarts=0", str(REPO / script), *OWN[script], *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for_epochs(path, n, proc, limit=240):
    start = time.time()
    while time.time() - start < limit:
        try:
            if len(json.loads(path.read_text())["epochs"]) >= n:
                return
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"no epoch written to {path} within {limit}s")


def _rank_pids(agent):
    """PIDs of the agent's worker processes, by their RANK."""
    pids = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    ranks = {}
    for pid in pids:
        env = dict(item.split("=", 1) for item in
                   open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace").split("\0") if "=" in item)
        if "RANK" in env:
            ranks[int(env["RANK"])] = int(pid)
    return ranks


def _assert_kept(path, min_epochs=1):
    data = json.loads(path.read_text())  # valid JSON, not a half-written file
    assert data["status"] == "incomplete" and len(data["epochs"]) >= min_epochs
    assert all(e["epoch"] == i + 1 for i, e in enumerate(data["epochs"]))
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]


FAULTS = [("baseline_multi_card.py", 2, 1, signal.SIGKILL),
          ("baseline_multi_card.py", 2, 1, signal.SIGSTOP),  # a hung peer: only --timeout ends the wait
          ("all_reduce_train.py", 2, 1, signal.SIGKILL),
          ("ps_train.py", 3, 0, signal.SIGKILL),  # the server
          ("ps_train.py", 3, 2, signal.SIGKILL),  # a worker that does not write the results
          ("ps_train.py", 3, 0, signal.SIGSTOP)]  # a hung server


@pytest.mark.parametrize("script,nproc,victim,sig", FAULTS)
def test_a_dead_or_hung_rank_fails_the_run_within_the_timeout(tmp_path, data, script, nproc, victim, sig):
    out = tmp_path / "r.json"
    timeout_min = 0.15
    agent = _torchrun(script, nproc, [*TINY, "--epochs", "500", "--timeout", timeout_min, "--data-dir", data,
                                      "--output", out], tmp_path)
    try:
        _wait_for_epochs(out, 1, agent)
        os.kill(_rank_pids(agent)[victim], sig)
        killed = time.time()
        _, err = agent.communicate(timeout=60 * timeout_min + 60)
        assert time.time() - killed < 60 * timeout_min + 45
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    assert agent.returncode != 0
    _assert_kept(out)
    if sig == signal.SIGSTOP:  # survivors say in one line what happened instead of a gloo traceback
        assert "error: communication with another process failed" in err


def test_ctrl_c_keeps_finished_epochs(tmp_path, data):
    out = tmp_path / "r.json"
    agent = _torchrun("baseline_multi_card.py", 2, [*TINY, "--epochs", "500", "--data-dir", data, "--output", out],
                      tmp_path)
    try:
        _wait_for_epochs(out, 1, agent)
        os.killpg(agent.pid, signal.SIGINT)
        _, err = agent.communicate(timeout=60)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    assert agent.returncode != 0 and "interrupted" in err
    _assert_kept(out)


SCALE_OUT = [("baseline_multi_card.py", 1), ("all_reduce_train.py", 1), ("ps_train.py", 2)]


@pytest.mark.parametrize("script,per_node", SCALE_OUT)
def test_two_nodes_train_exactly_like_one(tmp_path, data, script, per_node):
    """Two torchrun agents on 127.0.0.1 (c10d rendezvous) = one agent with the same world size and seed."""
    args = [*TINY, "--epochs", "1", "--max-steps", "3", "--data-dir", data]
    single = _torchrun(script, 2 * per_node, [*args, "--output", tmp_path / "one.json"], tmp_path)
    assert single.wait(timeout=300) == 0, single.communicate()[1][-3000:]
    port = free_port()
    nodes = [_torchrun(script, per_node, [*args, "--output", tmp_path / f"two{n}.json"], tmp_path, nnodes=2,
                       node_rank=n, port=port) for n in (0, 1)]
    for node in nodes:
        assert node.wait(timeout=300) == 0, node.communicate()[1][-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    written = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("two*.json"))]
    assert len(written) == 1  # one writer in the whole job, whichever node it is on
    two = written[0]
    assert two["world_size"] == one["world_size"] == 2 * per_node
    assert two["all_losses"] == pytest.approx(one["all_losses"], rel=1e-6)
    assert two["epochs"][-1]["val_loss"] == pytest.approx(one["epochs"][-1]["val_loss"], rel=1e-6)
