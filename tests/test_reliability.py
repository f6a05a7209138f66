"""Faults and scale-out with real processes: a killed, stopped or interrupted rank never hangs the run nor
loses finished epochs, also on a loaded machine; every failure under torchrun is one `error:` line on a line of
its own; two torchrun agents (two simulated nodes) train exactly like one."""
import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
import torch

from dist_helpers import (FAST_ARGS, REPO, Forked, epochs_written, free_port, killed_at_exit, make_image_folder,
                          rank_pids, run_forked, start_script, two_at_a_time, wait_until)

# Tiny runs without the communication yardstick.
TINY = [*FAST_ARGS, "--batch-size", "2"]


def _torchrun(script, nproc, args, cwd, **launch):
    return start_script(script, *args, nproc=nproc, cwd=cwd, **launch)


def _wait_for_epochs(path, n, proc, limit=240):
    wait_until(proc, lambda: epochs_written(path) >= n, f"epoch {n} written to {path}", limit)


def _rank_pids(agent):
    """PIDs of the agent's worker processes, by their RANK."""
    return {rank: pid for rank, (pid, _) in rank_pids(agent).items()}


def _assert_kept(path, min_epochs=1):
    data = json.loads(path.read_text())  # valid JSON, not a half-written file
    assert data["status"] == "incomplete" and len(data["epochs"]) >= min_epochs
    assert all(e["epoch"] == i + 1 for i, e in enumerate(data["epochs"]))
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]


FAULTS = [("baseline_multi_card.py", 2, 1, signal.SIGKILL),  # a hung DDP peer (SIGSTOP): the loaded test below
          ("all_reduce_train.py", 2, 1, signal.SIGKILL),
          ("ps_train.py", 3, 0, signal.SIGKILL),  # the server
          ("ps_train.py", 3, 2, signal.SIGKILL),  # a worker that does not write the results
          ("ps_train.py", 3, 0, signal.SIGSTOP)]  # a hung server


def _our_tracebacks(text):
    """Lines of Python tracebacks from our processes: a frame in one of this repository's scripts, or a rank's
    traceback. (torchrun's own ChildFailedError report, which follows any failed child, has neither.)"""
    ours = re.compile(rf'File "{re.escape(str(REPO))}/[^/"]+\.py"|^\[rank\d+\]:\s*Traceback')
    return [line for line in text.splitlines() if ours.search(line)]


def _busy_loops(n):
    """`n` processes that keep a CPU core busy: a loaded machine, where timings stretch."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


@pytest.fixture(scope="module")
def faults(tmp_path_factory, tiny_data):
    """The outcome of each of FAULTS, two runs at a time (forked, a run is mostly the wait for its peers' end)."""
    return two_at_a_time(lambda i: _fail_a_rank(tmp_path_factory.mktemp(f"fault{i}"), tiny_data, *FAULTS[i]),
                         range(len(FAULTS)))


@pytest.mark.parametrize("fault", range(len(FAULTS)), ids=[f"{s}-{n}-{v}-{sig.name}" for s, n, v, sig in FAULTS])
def test_a_dead_or_hung_rank_fails_the_run_within_the_timeout(faults, fault):
    faults[fault]()


def test_a_hung_ddp_peer_on_a_loaded_machine_is_one_error_line(tmp_path, tiny_data):
    """A hung peer (SIGSTOP: only --timeout ends the wait), while two busy loops compete for the 2 cores from the
    hang until the others gave up."""
    err = _fail_a_rank(tmp_path, tiny_data, "baseline_multi_card.py", 2, 1, signal.SIGSTOP, under_torchrun=True,
                       load=2)
    assert len([line for line in err.splitlines() if "error:" in line]) == 1, err[-3000:]


def _alive(pid):
    """Whether process `pid` still runs (a zombie waiting for torchrun to reap it has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _fail_a_rank(tmp_path, tiny_data, script, nproc, victim, sig, under_torchrun=False, load=0):
    """Kills or stops rank `victim` after epoch 1: every other rank must end within --timeout (plus slack),
    the run must fail, and the finished epoch be kept. The ranks are forked (Forked), so the survivors find out
    by themselves, as on another node; or `under_torchrun`, whose agent stops the others when one dies. `load`
    busy loops compete for the cores from the fault on. Returns the run's stderr."""
    out = tmp_path / "r.json"
    timeout_min = 0.1  # 6 s: a hung peer is found out after it
    args = [*TINY, "--epochs", "500", "--max-steps", "3", "--timeout", timeout_min, "--data-dir", tiny_data,
            "--output", out]
    agent = _torchrun(script, nproc, args, tmp_path) if under_torchrun else Forked(script, *args, nproc=nproc,
                                                                                   cwd=tmp_path)
    with killed_at_exit(agent):
        _wait_for_epochs(out, 1, agent)
        pids = _rank_pids(agent) if under_torchrun else agent.pids
        busy = _busy_loops(load)
        try:
            os.kill(pids[victim], sig)
            killed = time.time()
            survivors = [pid for rank, pid in pids.items() if rank != victim]
            while any(map(_alive, survivors)) and time.time() - killed < 60 * timeout_min + 45:
                time.sleep(0.1)
            ended = time.time() - killed
        finally:
            for p in busy:
                p.kill()
                p.wait()
        if sig == signal.SIGSTOP:  # it then ends at once (its peers are gone; under torchrun, torchrun's SIGTERM)
            os.kill(pids[victim], signal.SIGCONT)
        _, err = agent.communicate(timeout=60)
        assert ended < 60 * timeout_min + 45, f"the other ranks took {ended:.0f}s to give up"
    assert agent.returncode != 0
    _assert_kept(out)
    if sig == signal.SIGSTOP:  # survivors say in one line what happened instead of a gloo traceback
        assert "error: communication with another process failed" in err, err[-3000:]
        assert not _our_tracebacks(err), err[-3000:]
    return err


def test_ctrl_c_keeps_finished_epochs(tmp_path, tiny_data):
    out = tmp_path / "r.json"
    agent = _torchrun("baseline_multi_card.py", 2, [*TINY, "--epochs", "500", "--max-steps", "3", "--data-dir",
                                                    tiny_data, "--output", out], tmp_path)
    with killed_at_exit(agent):
        _wait_for_epochs(out, 1, agent)
        os.killpg(agent.pid, signal.SIGINT)
        _, err = agent.communicate(timeout=60)
    assert agent.returncode != 0 and "stopped by SIGINT" in err, err[-3000:]  # faults.py: at an agreed step
    _assert_kept(out)


def test_two_nodes_train_exactly_like_one(tmp_path, tiny_data):
    """Two torchrun agents on 127.0.0.1 (c10d rendezvous) = the same world size and seed on one machine (its ranks
    forked, as torchrun --standalone sets them up). The PS, whose roles follow the global rank across nodes (the
    server on node 0, a worker on it too); DDP and the all-reduce on emulated nodes: tests/test_cluster.py. Every
    script joins its group through the same common.setup_distributed."""
    script, per_node = "ps_train.py", 2
    args = [*TINY, "--epochs", "1", "--max-steps", "3", "--data-dir", tiny_data]
    proc = run_forked(script, *args, "--output", tmp_path / "one.json", nproc=2 * per_node, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    port = free_port()
    jobs = [_torchrun(script, per_node, [*args, "--output", tmp_path / f"two{n}.json"], tmp_path, nnodes=2,
                      node_rank=n, port=port) for n in (0, 1)]
    with killed_at_exit(*jobs):
        for job in jobs:
            _, err = job.communicate(timeout=300)
            assert job.returncode == 0, err[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    written = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("two*.json"))]
    assert len(written) == 1  # one writer in the whole job, whichever node it is on
    two = written[0]
    assert two["world_size"] == one["world_size"] == 2 * per_node
    assert two["all_losses"] == pytest.approx(one["all_losses"], rel=1e-6)
    assert two["epochs"][-1]["val_loss"] == pytest.approx(one["epochs"][-1]["val_loss"], rel=1e-6)


# --------------------------------------------------------------------------- one error line, on a line of its own
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without GPUs")
def test_nccl_without_gpus_under_torchrun_is_one_line_every_time(tmp_path):
    """Both ranks fail at once, before any group exists: the first to report prints, the other stays silent
    (2 runs at once, so that their ranks race on a loaded machine)."""
    runs = [_torchrun("baseline_multi_card.py", 2, ["--backend", "nccl", "--output", tmp_path / f"r{i}.json"],
                      tmp_path) for i in range(2)]
    with killed_at_exit(*runs):
        for run in runs:
            out, err = run.communicate(timeout=120)
            lines = [line for line in (out + err).splitlines() if "error:" in line]
            assert run.returncode != 0 and len(lines) == 1, (out, err[-3000:])
            assert lines[0].startswith("error: --backend nccl needs GPUs") and "--backend auto or gloo" in lines[0]
            assert not _our_tracebacks(err), err[-3000:]
    assert not list(tmp_path.glob("r*.json"))


def _run_in_terminal(cmd, cwd, timeout):
    """Runs `cmd` with stdout and stderr on one pseudo-terminal (what a user watching it sees: tqdm's bar and
    the error line, interleaved); returns (exit code, everything written, as text)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(slave)
    chunks = []

    def read():
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        reader.join(timeout=10)
        os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


@pytest.mark.parametrize("output", ["pipe", "terminal"])
def test_a_corrupted_image_mid_epoch_under_torchrun_is_one_line_of_its_own(tmp_path, output):
    """Rank 1 meets a corrupted image at step 6 of 12 while rank 0 reports progress at every step: one
    `error:` line, which starts a line, never glued to a progress line. `pipe`: stdout and stderr into one
    pipe (plain progress lines); `terminal`: both on a pseudo-terminal (tqdm's bar, redrawn with \\r)."""
    from torchvision import datasets
    root = make_image_folder(tmp_path / "d", classes=2, train_per_class=24, val_per_class=2, size=16)
    train = datasets.ImageFolder(str(root / "train"))
    order = torch.utils.data.DistributedSampler(list(range(len(train))), 2, 1, shuffle=True, seed=0)
    order.set_epoch(1)  # as run_epoch does for epoch 1
    bad = Path(train.samples[list(order)[2 * 5]][0])  # rank 1, step 6 (batch 2)
    bad.write_bytes(b"not a png")
    args = [*TINY, "--log-every", "1", "--timeout", "0.5", "--data-dir", root, "--output", tmp_path / "r.json"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max_restarts=0",
           str(REPO / "baseline_multi_card.py"), *map(str, args)]
    if output == "pipe":
        proc = subprocess.run(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
        code, text = proc.returncode, proc.stdout
        assert "epoch 1 step 5/12" in text, text[-3000:]  # progress lines came before the error
    else:
        code, text = _run_in_terminal(cmd, tmp_path, 180)
        assert "5/12 [" in text, text[-3000:]  # tqdm's bar came before the error
    assert code != 0
    lines = [line for line in text.split("\n") if "error:" in line]
    assert len(lines) == 1, text[-3000:]
    # It starts its line (after a torchrun "[rankN]:" prefix, if any) and shares it with no progress output.
    assert re.match(r"(\[[^\]]*\]:?\s*)?error: cannot read image ", lines[0].lstrip("\r")), repr(lines[0])
    assert str(bad) in lines[0] and not re.search(r"epoch 1|step \d+/12|it/s|%\|", lines[0]), repr(lines[0])
    assert not _our_tracebacks(text), text[-3000:]
