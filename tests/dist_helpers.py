"""Test helpers: run a function in a real gloo process group, run a script under torchrun, make tiny data."""
import os
import socket
import subprocess
import sys
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


def run_script(script, *args, nproc=1, cwd=None, timeout=600, env=None):
    """Runs `torchrun --standalone --nproc_per_node=nproc script args` and returns the CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / script), *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


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


def error_lines(stderr):
    """The lines our scripts print for a user error (torchrun's own report is around them)."""
    return [line for line in stderr.splitlines() if "error: " in line and not line.startswith(("E", "W", " "))
            or line.startswith("error: ")]
