"""Test helpers: run a function in a real gloo process group, run or start a script under torchrun (and watch,
kill or restart its ranks), make tiny data, read a user error's one line."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent
# Small, fast settings for script runs on a 2-core CPU, without the communication yardstick (--overhead-pairs 0);
# tests that need the real ResNet50 path or the yardstick override them.
FAST_ARGS = ["--arch", "resnet18", "--image-size", "16", "--batch-size", "4", "--epochs", "1", "--workers", "0",
             "--timeout", "2", "--overhead-pairs", "0"]


def cli_args(**overrides):
    """The flags every script shares, at their defaults, with `overrides` set (no command line parsed)."""
    import common
    args = common.parse(common.make_parser("test", lambda a: "results.json"), [])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def cpu_ctx(rank=0, world=1):
    """A DistContext for a CPU process `rank` of `world` (gloo)."""
    import common
    import torch
    return common.DistContext(rank, rank, world, world, torch.device("cpu"), "gloo", rank == 0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, world_size, port, fn, args, init, queue):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    try:
        if init:
            import datetime
            dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=120))
        queue.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if init and dist.is_initialized():
            dist.destroy_process_group()


def run_in_group(fn, world_size, *args, init=True, timeout=300):
    """Runs `fn(rank, world_size, *args)` in `world_size` real processes (a gloo group when `init`).

    `fn` must be a module-level function. Returns the per-rank return values, ordered by rank;
    raises with the child's traceback if any rank failed.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world_size, port, fn, args, init, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]


def torchrun_cmd(script, *args, nproc=1, restarts=0, nnodes=1, node_rank=0, port=None):
    """The torchrun command line for `script args`: --standalone, or node `node_rank` of `nnodes` agents on
    127.0.0.1 (c10d rendezvous at `port`); torchrun restarts a failed group `restarts` times."""
    launch = ["--standalone"] if nnodes == 1 else [
        f"--nnodes={nnodes}", f"--node_rank={node_rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
        "--rdzv_id=kit-test"]
    return [sys.executable, "-m", "torch.distributed.run", *launch, f"--nproc_per_node={nproc}",
            f"--max_restarts={restarts}", str(REPO / script), *map(str, args)]


def _env(env):
    return {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}


def run_script(script, *args, nproc=1, cwd=None, timeout=600, env=None, **launch):
    """Runs `script args` under torchrun (see torchrun_cmd) to its end; returns the CompletedProcess."""
    return subprocess.run(torchrun_cmd(script, *args, nproc=nproc, **launch), cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=_env(env))


def start_script(script, *args, nproc=1, cwd=None, env=None, **launch):
    """Starts `script args` under torchrun (see torchrun_cmd) in a session of its own; returns the Popen (its
    .pid is torchrun's: the workers are its children)."""
    return subprocess.Popen(torchrun_cmd(script, *args, nproc=nproc, **launch), cwd=cwd, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(env))


@contextlib.contextmanager
def killed_at_exit(*procs):
    """Whatever still runs of `procs` (each a session of its own) is killed when the block ends, however."""
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def rank_pids(agent):
    """{RANK: (pid, TORCHELASTIC_RESTART_COUNT)} of a torchrun agent's current worker processes."""
    ranks = {}
    for pid in subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split():
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace")
        except OSError:
            continue
        env = dict(item.split("=", 1) for item in environ.split("\0") if "=" in item)
        if "RANK" in env:
            ranks[int(env["RANK"])] = (int(pid), int(env.get("TORCHELASTIC_RESTART_COUNT", 0)))
    return ranks


def kill_tree(pid):
    """SIGKILL to `pid` and all its descendants (the machine dies)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    os.kill(pid, signal.SIGKILL)
    for child in children:
        kill_tree(int(child))


def wait_until(proc, condition, what, limit=240):
    """Polls `condition()` until it is true; fails with `proc`'s stderr if it ends first, or after `limit` s."""
    start = time.time()
    while not condition():
        assert proc.poll() is None, f"ended before {what}: " + proc.communicate()[1][-3000:]
        assert time.time() - start < limit, f"no {what} within {limit}s"
        time.sleep(0.02)


def epochs_written(path):
    """How many epochs the results file at `path` holds (0 while it is missing or being written)."""
    try:
        return len(json.loads(Path(path).read_text())["epochs"])
    except (OSError, ValueError, KeyError):
        return 0


def run_python(script, *args, cwd=None, timeout=600, env=None):
    """Runs `python script args` (no torchrun: world size 1) and returns the CompletedProcess."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def make_image_folder(root, classes=3, train_per_class=8, val_per_class=3, size=20, seed=0):
    """A tiny ImageFolder tree (root/train/<class>/*.png, root/val/<class>/*.png); returns root."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = Path(root) / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = (rng.random((size, size, 3)) * 80 + c * 60).clip(0, 255).astype("uint8")
                Image.fromarray(img).save(folder / f"{i}.png")
    return Path(root)


def one_error_line(proc, prefix="error: ", code=None):
    """The one line a user mistake prints on stderr (`prefix` ...), after checking it is the only one and the run
    failed (with exit status `code` when given)."""
    assert proc.returncode != 0 if code is None else proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), proc.stderr[-3000:]
    return lines[0]


def error_lines(stderr):
    """The lines our scripts print for a user error (torchrun's own report is around them)."""
    return [line for line in stderr.splitlines() if "error: " in line and not line.startswith(("E", "W", " "))
            or line.startswith("error: ")]
