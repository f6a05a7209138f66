"""Test helpers: run a function in a real gloo process group, run a script's ranks (forked, or under torchrun, whose
ranks can be watched, killed or restarted), make tiny data, read a user error's one line."""
import concurrent.futures
import contextlib
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
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


# Every process the tests start for a function or a script's ranks is forked from one server that imported these once:
# a fresh `python` spends ~4.5 s of CPU importing torch and torchvision (torchvision imports torch._dynamo), which on
# our 2 cores was half the suite's time.
PRELOAD = ["torch", "torch.distributed", "torchvision", "PIL.Image", "numpy", "tqdm", "common", "data", "measure",
           "checkpoint", "results", "modes", "driver", "baseline_multi_card", "all_reduce_train", "ps_train",
           "dist_helpers"]


def forked():
    """The multiprocessing context whose processes are forked from the preloading server (no threads there yet,
    so a fork is safe)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


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
    ctx = forked()
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


def two_at_a_time(fn, cases):
    """{case: outcome} for every case: `fn(case)` runs in threads, two cases at a time, and `outcome()` returns its
    result or raises what it raised, so each test checks its own case. For independent runs whose time goes to
    starting processes and waiting for timeouts more than to the 2 cores."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case: pool.submit(fn, case) for case in cases}
    return {case: future.result for case, future in futures.items()}


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


def _rank_main(script, args, env, cwd, out, err):
    """A forked child becomes `python script args` with environment `env` in `cwd`, writing to files `out` and
    `err`: the script runs as __main__, its exit status is the process's."""
    import torch
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # read from TMPDIR again, as a fresh python does
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", torch.get_num_threads())))
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = [str(script), *args]
    sys.path.insert(0, str(Path(script).parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit:
        raise
    except BaseException:  # as python prints it, without multiprocessing's "Process ...:" line
        traceback.print_exc()
        raise SystemExit(1)


class Forked:
    """`script args` started like `python script` (nproc None) or like torchrun --standalone --nproc_per_node=nproc
    starts it (each rank gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT), every
    process forked from the preloading server, so it starts in well under a second. For tests of what the scripts
    do; what torchrun itself adds (its agent, restarts, its failure report) is tested under torchrun
    (run_script, start_script)."""

    def __init__(self, script, *args, nproc=None, cwd=None, env=None):
        self.script, self.args, ctx = script, list(map(str, args)), forked()
        self._logs = tempfile.TemporaryDirectory()
        base = _env({k: str(v) for k, v in (env or {}).items()})
        port, self.procs = free_port(), []
        for rank in [None] if nproc is None else range(nproc):
            rank_env = dict(base) if rank is None else {
                **base, "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "WORLD_SIZE": str(nproc),
                "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            out, err = (Path(self._logs.name) / f"{rank}.{kind}" for kind in ("out", "err"))
            out.touch()
            err.touch()  # empty if the child dies before it opens them
            proc = ctx.Process(target=_rank_main, args=(str(REPO / script), self.args, rank_env,
                                                        str(cwd or os.getcwd()), str(out), str(err)))
            proc.start()
            self.procs.append((proc, out, err))

    @property
    def pids(self):
        """{rank: pid} (rank 0 alone without nproc)."""
        return {rank: proc.pid for rank, (proc, _, _) in enumerate(self.procs)}

    @property
    def returncode(self):
        return self.poll()

    def poll(self):
        """None while a process runs, else the run's exit status (see wait)."""
        if any(proc.is_alive() for proc, _, _ in self.procs):
            return None
        code = next((c for c in (proc.exitcode for proc, _, _ in self.procs) if c != 0), 0)
        return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell says

    def wait(self, timeout=600):
        """Waits for every process; returns a CompletedProcess: stdout and stderr of the ranks in rank order, status
        0 when every rank's is 0, else the first non-zero one. A rank still running 30 s after another failed is
        killed (torchrun stops the group at once); past `timeout`, all are killed and TimeoutExpired raised."""
        deadline, failed_at = time.time() + timeout, None
        try:
            while self.poll() is None:
                if failed_at is None and any(proc.exitcode not in (None, 0) for proc, _, _ in self.procs):
                    failed_at = time.time()
                if failed_at is not None and time.time() > failed_at + 30:
                    break
                if time.time() > deadline:
                    raise subprocess.TimeoutExpired(self.script, timeout)
                time.sleep(0.02)
        finally:
            self.kill()
        stdout, stderr = ("".join(path.read_text(errors="replace") for path in paths)
                          for paths in zip(*(files for _, *files in self.procs)))
        self._logs.cleanup()
        return subprocess.CompletedProcess([self.script, *self.args], self.poll(), stdout, stderr)

    def communicate(self, timeout=600):
        """(stdout, stderr), as Popen's: see wait."""
        done = self.wait(timeout)
        return done.stdout, done.stderr

    def kill(self):
        """SIGKILL to every process still running (the machine dies), then reaps them."""
        for proc, _, _ in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc, _, _ in self.procs:
            proc.join()


def run_forked(script, *args, nproc=None, cwd=None, timeout=600, env=None):
    """Runs `script args` in forked processes (see Forked) to its end; returns the CompletedProcess."""
    return Forked(script, *args, nproc=nproc, cwd=cwd, env=env).wait(timeout)


def start_script(script, *args, nproc=1, cwd=None, env=None, **launch):
    """Starts `script args` under torchrun (see torchrun_cmd) in a session of its own; returns the Popen (its
    .pid is torchrun's: the workers are its children)."""
    return subprocess.Popen(torchrun_cmd(script, *args, nproc=nproc, **launch), cwd=cwd, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(env))


@contextlib.contextmanager
def killed_at_exit(*procs):
    """Whatever still runs of `procs` (Forked, or Popen each a session of its own) is killed when the block ends,
    however."""
    try:
        yield
    finally:
        for proc in procs:
            if isinstance(proc, Forked):
                proc.kill()
            elif proc.poll() is None:
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
