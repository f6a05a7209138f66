"""The faults of docs/faults.md with real processes and real gloo groups: a stop signal (SIGTERM, SIGINT) ends every
rank at one agreed step with a checkpoint there, and --resume continues to the per-step losses of a run that was
never stopped; a full or read-only disk under the checkpoints or the results; a hang that names the rank it waits
for."""
import json
import os
import signal
import subprocess
import time

import pytest

from dist_helpers import FAST_ARGS, REPO, Forked, killed_at_exit, run_forked, start_script, wait_until

ARGS = [*FAST_ARGS, "--batch-size", "2", "--max-steps", "6", "--log-every", "1", "--timeout", "1"]


def _progress(out):
    try:
        return int((out.with_name(out.stem + ".ckpt") / "progress").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return -1


def _losses(path):
    return json.loads(path.read_text())["all_losses"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_ends_every_rank_at_one_step_and_resume_gives_the_same_losses(tmp_path, tiny_data, sig):
    """Every rank gets the signal (as from a scheduler, or Ctrl-C in a terminal) mid-epoch 2; every rank ends within
    seconds with 128 + the signal, one `stopped by` line, the finished epoch in valid JSON and a checkpoint at the
    agreed step; --resume then ends with an uninterrupted run's per-step losses."""
    whole, cut = tmp_path / "whole" / "r.json", tmp_path / "cut" / "r.json"
    whole.parent.mkdir()
    cut.parent.mkdir()
    common = [*ARGS, "--data-dir", tiny_data, "--checkpoint-every", "100", "--resume"]
    run = Forked("baseline_multi_card.py", *common, "--epochs", "50", "--output", cut, nproc=2, cwd=cut.parent)
    with killed_at_exit(run):
        wait_until(run, lambda: _progress(cut) >= 8, "step 8")
        for pid in run.pids.values():
            os.kill(pid, sig)
        signalled = time.time()
        done = run.wait(timeout=60)
        took = time.time() - signalled
    assert done.returncode == 128 + sig, (done.returncode, done.stderr[-3000:])
    assert took < 15, f"{took:.1f}s to stop"
    lines = [line for line in done.stderr.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1 and sig.name in lines[0] and "--resume" in lines[0], done.stderr[-3000:]
    data = json.loads(cut.read_text())
    step = data["stopped"]["after_step"]
    assert 8 < step <= 12 and data["stopped"]["signal"] == sig.name
    assert data["status"] == "incomplete" and [e["epoch"] for e in data["epochs"]] == list(range(1, step // 6 + 1))
    latest = cut.with_name("r.ckpt") / "latest"
    assert latest.read_text() == f"step{step:08d}"
    resumed = run_forked("baseline_multi_card.py", *common, "--epochs", "3", "--output", cut, nproc=2,
                         cwd=cut.parent, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed after epoch {step // 6}" in resumed.stdout
    reference = run_forked("baseline_multi_card.py", *common, "--epochs", "3", "--output", whole, nproc=2,
                           cwd=whole.parent, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert _losses(cut) == _losses(whole) and len(_losses(whole)) == 18
    print(f"\n{sig.name}: stopped after step {step} in {took:.2f}s; {lines[0]}")


def test_sigterm_to_torchrun_stops_its_workers_within_seconds(tmp_path, tiny_data):
    """What SLURM does: SIGTERM to torchrun, which passes it to its workers: they stop within seconds, one line says
    so, and the results say where it stopped. (torchrun itself then exits 1 with its own SignalException report:
    its status is torchrun's, not the kit's.)"""
    out = tmp_path / "r.json"
    agent = start_script("all_reduce_train.py", *ARGS, "--data-dir", tiny_data, "--epochs", "50", "--resume",
                         "--output", out, nproc=2, cwd=tmp_path)
    with killed_at_exit(agent):
        wait_until(agent, lambda: _progress(out) >= 8, "step 8")
        agent.send_signal(signal.SIGTERM)
        signalled = time.time()
        _, err = agent.communicate(timeout=60)
        took = time.time() - signalled
    assert took < 15 and agent.returncode != 0, (agent.returncode, err[-3000:])
    assert len([line for line in err.splitlines() if "stopped by SIGTERM" in line]) == 1, err[-3000:]
    assert json.loads(out.read_text())["stopped"]["signal"] == "SIGTERM"
    print(f"\ntorchrun SIGTERM: exit {agent.returncode} in {took:.2f}s")


# --------------------------------------------------------------------------- a full or read-only disk
@pytest.fixture
def small_disk(tmp_path):
    """A 256 MiB tmpfs the test mounts at tmp_path/disk and unmounts (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _while_stopped(run, action):
    """`action()` with every rank stopped (SIGSTOP), so the fault lands between two known checkpoints."""
    for pid in run.pids.values():
        os.kill(pid, signal.SIGSTOP)
    try:
        action()
    finally:
        for pid in run.pids.values():
            os.kill(pid, signal.SIGCONT)


def _fill(disk):
    """Leaves 512 KiB free on `disk`: room for the results file, not for a checkpoint."""
    st = os.statvfs(disk)
    subprocess.run(["fallocate", "-l", str(st.f_bavail * st.f_frsize - 512 * 1024), str(disk / "filler")],
                   check=True)


def _checkpoint_ok(folder):
    """The part `latest` names is whole: its checksum matches."""
    import hashlib
    part = folder / (folder / "latest").read_text() / "rank0.pt"
    return hashlib.sha256(part.read_bytes()).hexdigest() == part.with_suffix(".sha256").read_text().strip()


def test_a_full_disk_keeps_the_last_checkpoint_and_the_run_goes_on(small_disk, tiny_data):
    """The disk fills after the step-4 checkpoint: the step-8 one fails on every rank; one line names the path and
    the cause, the step-4 checkpoint stays whole and `latest`, and the run ends complete without checkpoints."""
    out = small_disk / "r.json"
    run = Forked("baseline_multi_card.py", *ARGS, "--data-dir", tiny_data, "--epochs", "2", "--checkpoint-every",
                 "4", "--output", out, nproc=2, cwd=small_disk)
    folder = small_disk / "r.ckpt"
    with killed_at_exit(run):
        wait_until(run, lambda: (folder / "latest").exists(), "the step-4 checkpoint")
        _while_stopped(run, lambda: _fill(small_disk))
        done = run.wait(timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("warning: checkpoint not written")]
    assert len(lines) == 1 and "No space left on device" in lines[0] and str(folder) in lines[0], done.stdout[-3000:]
    assert (folder / "latest").read_text() == "step00000004" and _checkpoint_ok(folder)
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")] and not (folder / "step00000008").exists()
    data = json.loads(out.read_text())
    assert data["status"] == "complete" and len(data["all_losses"]) == 12
    print(f"\nfull disk: {lines[0]}")


def test_a_read_only_disk_keeps_the_last_good_results(small_disk, tiny_data):
    """The disk turns read-only after epoch 1: checkpoints and results fail from then on, each said once; the results
    file keeps epoch 1 as valid JSON, and the run's end is one error line (exit 2)."""
    out = small_disk / "r.json"
    run = Forked("all_reduce_train.py", *ARGS, "--data-dir", tiny_data, "--epochs", "2", "--resume", "--output", out,
                 nproc=2, cwd=small_disk)
    with killed_at_exit(run):
        wait_until(run, lambda: json.loads(out.read_text() or "{}").get("epochs") if out.exists() else False,
                   "epoch 1 written")
        _while_stopped(run, lambda: subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True))
        done = run.wait(timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    said = [line for line in done.stdout.splitlines() if line.startswith("warning: ")]
    assert len([s for s in said if s.startswith("warning: results not written")]) == 1, done.stdout[-3000:]
    assert all("Read-only file system" in s for s in said), said
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "could not be written" in errors[0], done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["status"] == "incomplete" and [e["epoch"] for e in data["epochs"]] == [1]
    print("\nread-only disk:", *said, errors[0], sep="\n")


# --------------------------------------------------------------------------- a hang that names its rank
HANGS = [("baseline_multi_card.py", 2, 1, "baseline_ddp"), ("all_reduce_train.py", 2, 1, "all_reduce"),
         ("ps_train.py", 3, 2, "ps")]  # the PS: a worker that does not write the results


@pytest.mark.parametrize("script,nproc,victim,kind", HANGS, ids=[k for *_, k in HANGS])
def test_a_hang_names_the_rank_that_never_arrived(tmp_path, tiny_data, script, nproc, victim, kind):
    """Rank `victim` stops itself (SIGSTOP) just before global step 9 (epoch 2, step 3): every surviving rank ends
    within --timeout (6 s) plus slack, with one `hang:` line naming the method, its step and the stopped rank, and
    the results JSON records it."""
    out = tmp_path / "r.json"
    run = Forked(script, *ARGS, "--timeout", "0.1", "--epochs", "3", "--data-dir", tiny_data, "--output", out,
                 nproc=nproc, cwd=tmp_path, env={"KIT_STOP_RANK_AT": f"{victim}:9"})
    with killed_at_exit(run):
        survivors = [proc for rank, (proc, _, _) in enumerate(run.procs) if rank != victim]
        wait_until(run, lambda: not any(p.is_alive() for p in survivors), "the survivors' end", limit=90)
        os.kill(run.pids[victim], signal.SIGKILL)
        done = run.wait(timeout=30)
    lines = [line for line in done.stderr.splitlines() if line.startswith("hang: ")]
    assert len(lines) == nproc - 1, done.stderr[-3000:]
    for line in lines:
        assert f"in {kind} step 9" in line and f"had not arrived: rank {victim} (still at step 8)" in line, line
    hang = json.loads(out.read_text())["hang"]
    assert hang["not_arrived"] == [victim] and hang["step"] == 9 and hang["method"] == kind
    print("", *lines, sep="\n")


# --------------------------------------------------------------------------- a link that goes down or slows
def _emu(*args, timeout=60):
    return subprocess.run(["bash", str(REPO / "emulate_cluster.sh"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def _qdisc(ns, dev):
    return subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", dev], capture_output=True,
                          text=True).stdout


def _port_up(name, node):
    out = subprocess.run(["ip", "-n", f"{name}-switch", "-br", "link", "show", f"sw-p{node}"], capture_output=True,
                         text=True).stdout
    return out.split()[1] if out.split() else "?"


@pytest.mark.skipif(os.geteuid() != 0, reason="emulate_cluster.sh needs root (network namespaces, tc)")
def test_link_down_and_link_rate_are_injected_and_undone():
    """On a 2-node emulated cluster of its own: link-down takes node 1's link down for its seconds, then up;
    link-rate shapes it both ways to the rate given and, after its seconds, back to the cluster's."""
    name = f"kitf{os.getpid() % 100000}"
    assert _emu("up", "--nodes", 2, "--rate", "100mbit", "--name", name).returncode == 0
    try:
        down = subprocess.Popen(["bash", str(REPO / "emulate_cluster.sh"), "link-down", "--name", name, "1", "1.5"],
                                stdout=subprocess.PIPE, text=True)
        time.sleep(0.7)
        during = _port_up(name, 1)
        down.wait(timeout=30)
        assert down.returncode == 0 and during == "DOWN" and _port_up(name, 1) in ("UP", "LOWERLAYERDOWN")
        slow = subprocess.Popen(["bash", str(REPO / "emulate_cluster.sh"), "link-rate", "--name", name, "1", "10mbit",
                                 "1.5"], stdout=subprocess.PIPE, text=True)
        time.sleep(0.7)
        during = _qdisc(f"{name}-node1", "eth-n1") + _qdisc(f"{name}-switch", "sw-p1")
        slow.wait(timeout=30)
        after = _qdisc(f"{name}-node1", "eth-n1") + _qdisc(f"{name}-switch", "sw-p1")
        assert slow.returncode == 0 and during.count("rate 10Mbit") == 2 and after.count("rate 100Mbit") == 2
        bad = _emu("link-rate", "--name", name, 5, "10mbit")
        assert bad.returncode == 2 and "not a node of cluster" in bad.stderr
    finally:
        _emu("down", "--name", name)
