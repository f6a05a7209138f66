"""requirements.txt's lower bounds are the versions the code really needs: the installed versions meet them, and
the torch features the code calls (and that older releases lack) are there."""
import inspect
import re
from importlib.metadata import version
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent


def _floor(package):
    line = next(x for x in (REPO / "requirements.txt").read_text().splitlines() if x.startswith(package + ">="))
    return tuple(int(n) for n in line.split(">=")[1].split("."))


def _installed(package):
    return tuple(int(n) for n in re.match(r"(\d+)\.(\d+)", version(package)).groups())


def test_installed_versions_meet_the_floors():
    for package in ("torch", "torchvision", "tqdm", "matplotlib", "numpy"):
        assert _installed(package) >= _floor(package), package


def test_the_floor_is_where_the_features_the_code_needs_arrived():
    # torch 2.3: init_process_group(device_id=...) (binds NCCL to the process's GPU) and torch.amp.GradScaler(device)
    assert _floor("torch") >= (2, 3) and _floor("torchvision") >= (0, 18)
    assert "device_id" in inspect.signature(dist.init_process_group).parameters
    assert "device" in inspect.signature(torch.amp.GradScaler).parameters
    # and the rest, which came earlier
    assert hasattr(dist, "DistError") and hasattr(dist, "get_process_group_ranks")
    assert hasattr(torch, "_foreach_copy_") and hasattr(torch.Tensor, "register_post_accumulate_grad_hook")
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    assert hasattr(default_hooks, "bf16_compress_hook") and hasattr(powerSGD_hook, "PowerSGDState")
