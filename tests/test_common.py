"""common.py: distributed setup, data (incl. the sample dataset), exact evaluation, results writing."""
import argparse
import json
import math

import pytest
import torch

import common
from dist_helpers import make_image_folder, run_in_group


def _args(**overrides):
    args = common.make_parser("test", "results.json").parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


# --------------------------------------------------------------------------- setup
def _setup_and_sum(rank, world_size):
    ctx = common.setup_distributed(_args(backend="auto", timeout=1.0))
    try:
        t = torch.ones(1, device=ctx.device)
        common.all_reduce_sum(t)
        return dict(rank=ctx.rank, world=ctx.world_size, backend=ctx.backend, device=str(ctx.device),
                    is_main=ctx.is_main, total=t.item())
    finally:
        common.cleanup_distributed()


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_setup_joins_a_real_group(world_size):
    out = run_in_group(_setup_and_sum, world_size, init=False)
    assert [o["rank"] for o in out] == list(range(world_size))
    assert all(o["world"] == world_size and o["total"] == world_size for o in out)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    expected = ("nccl", "cuda:") if gpus >= world_size else ("gloo", "cpu")  # auto: NCCL only with a GPU each
    assert all(o["backend"] == expected[0] and o["device"].startswith(expected[1]) for o in out)
    assert [o["is_main"] for o in out] == [True] + [False] * (world_size - 1)


def test_setup_without_torchrun_env_is_a_group_of_one(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    ctx = common.setup_distributed(_args())
    try:
        assert (ctx.rank, ctx.world_size, ctx.is_main) == (0, 1, True)
    finally:
        common.cleanup_distributed()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without GPUs")
def test_nccl_without_gpus_is_a_user_error():
    with pytest.raises(common.UserError, match="GPU"):
        common.setup_distributed(_args(backend="nccl"))


# --------------------------------------------------------------------------- data
def test_sample_dataset_is_deterministic_and_cached(tmp_path):
    first = common.ensure_sample_dataset(tmp_path / "a")
    second = common.ensure_sample_dataset(tmp_path / "b")
    files = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    assert len(files) == len(common.SAMPLE_CLASSES) * (common.SAMPLE_TRAIN_PER_CLASS + common.SAMPLE_VAL_PER_CLASS)
    assert files == sorted(p.relative_to(second) for p in second.rglob("*.png"))
    for rel in files[:: len(files) // 7]:
        assert (first / rel).read_bytes() == (second / rel).read_bytes()
    mtime = (first / files[0]).stat().st_mtime
    assert common.ensure_sample_dataset(tmp_path / "a") == first  # cached: not regenerated
    assert (first / files[0]).stat().st_mtime == mtime


def test_sample_classes_are_distinguishable():
    """Learnable: a nearest-class-mean classifier on raw pixels beats chance clearly (10% for 10 classes)."""
    import numpy as np
    rng = np.random.default_rng(0)
    feats = lambda img: np.abs(np.fft.fft2(img.mean(-1) - img.mean())).ravel()[:300]  # placement-invariant
    train = [(feats(common._sample_image(c, rng, 48).astype(float)), c) for c in range(10) for _ in range(30)]
    test = [(feats(common._sample_image(c, rng, 48).astype(float)), c) for c in range(10) for _ in range(10)]
    means = np.stack([np.mean([f for f, c in train if c == k], 0) for k in range(10)])
    acc = np.mean([np.argmin(((means - f) ** 2).sum(1)) == c for f, c in test])
    assert acc > 0.3


def test_resolve_data_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert common.resolve_data(_args()) == ("sample", None)  # nothing given, no ./train
    with pytest.raises(common.UserError, match="does not exist"):
        common.resolve_data(_args(data_dir=str(tmp_path / "nope")))
    (tmp_path / "d" / "train").mkdir(parents=True)
    with pytest.raises(common.UserError, match="val"):
        common.resolve_data(_args(data_dir=str(tmp_path / "d")))
    (tmp_path / "d" / "val").mkdir()
    assert common.resolve_data(_args(data_dir=str(tmp_path / "d")))[0] == "imagefolder"
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    assert common.resolve_data(_args()) == ("imagefolder", type(tmp_path)("."))  # the guide's default ./


def _eval_sharded(rank, world_size, root):
    """Evaluates a seeded tiny model on `root`'s val set sharded over the group, and on the whole set alone."""
    args = _args(data_dir=root, arch="resnet18", image_size=16, batch_size=2, workers=0)
    ctx = common.DistContext(rank, rank, world_size, world_size, torch.device("cpu"), "gloo", rank == 0)
    _, val, info, _ = common.build_data(args, ctx, world_size, rank)
    model, _ = common.build_model(args, ctx, info.num_classes)
    sharded = common.evaluate(model, val, ctx, args)
    full = torch.utils.data.DataLoader(val.dataset, batch_size=5)
    loss = correct = 0.0
    with torch.no_grad():
        model.eval()
        for images, targets in full:
            logits = model(images)
            loss += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            correct += (logits.argmax(1) == targets).sum().item()
    n = len(val.dataset)
    return sharded, (loss / n, 100 * correct / n), len(val.sampler)


@pytest.mark.parametrize("world_size", [2, 4])
def test_distributed_eval_is_exact_when_the_sampler_would_pad(tmp_path, world_size):
    root = make_image_folder(tmp_path / "data", classes=3, train_per_class=8, val_per_class=3)  # 9 val images
    out = run_in_group(_eval_sharded, world_size, str(root))
    assert sum(o[2] for o in out) == 9  # shards cover the set exactly once, no padding
    for sharded, single, _ in out:
        assert sharded[0] == pytest.approx(single[0], rel=1e-5)
        assert sharded[1] == pytest.approx(single[1])


def test_build_data_rejects_batch_larger_than_shard(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=2, train_per_class=4, val_per_class=1)
    ctx = common.DistContext(0, 0, 1, 1, torch.device("cpu"), "gloo", True)
    with pytest.raises(common.UserError, match="larger than the 4 training images"):
        common.build_data(_args(data_dir=str(root), batch_size=5), ctx, 2, 0)


def test_synthetic_loader_gives_the_real_step_count(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=2, train_per_class=10, val_per_class=1)
    ctx = common.DistContext(0, 0, 1, 1, torch.device("cpu"), "gloo", True)
    args = _args(data_dir=str(root), batch_size=3, synthetic=True, image_size=8)
    train, _, info, steps = common.build_data(args, ctx, 2, 0)
    assert steps == math.ceil(10 / 3) and len(train) == steps  # 20 images over 2 replicas, batch 3
    batches = list(train)
    assert len(batches) == steps and batches[0][0].shape == (3, 3, 8, 8)
    assert "synthetic" in info.name


# --------------------------------------------------------------------------- model
def test_model_head_resized_and_identical_across_seeds():
    ctx = common.DistContext(0, 0, 1, 1, torch.device("cpu"), "gloo", True)
    a, source = common.build_model(_args(arch="resnet18"), ctx, 7)
    b, _ = common.build_model(_args(arch="resnet18"), ctx, 7)
    assert a.fc.out_features == 7 and source == "random init"
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_weights_file_is_loaded_and_a_wrong_one_rejected(tmp_path):
    from torchvision import models
    ctx = common.DistContext(0, 0, 1, 1, torch.device("cpu"), "gloo", True)
    torch.manual_seed(123)
    reference = models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    model, source = common.build_model(_args(arch="resnet18", weights=str(tmp_path / "w.pth")), ctx, 1000)
    assert source.endswith("w.pth")
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(common.UserError, match="not a resnet18 state dict"):
        common.build_model(_args(arch="resnet18", weights=str(tmp_path / "bad.pth")), ctx, 10)


# --------------------------------------------------------------------------- metrics and results
def test_run_epoch_counts_and_losses():
    ctx = common.DistContext(0, 0, 1, 1, torch.device("cpu"), "gloo", True)
    args = _args(log_every=2, warmup_steps=1)
    images, targets = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    loader = [(images, targets)] * 3
    losses = iter([torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)])

    def step(x, y, clock):
        clock.mark("compute")
        return next(losses), torch.tensor([[1.0, 0.0]] * 4)  # always predicts class 0: 50% correct

    rec = common.run_epoch(ctx, args, 1, loader, 3, step)
    assert rec["all_losses"] == [1.0, 2.0, 3.0]
    assert rec["train_loss"] == pytest.approx(2.0) and rec["train_accuracy"] == pytest.approx(50.0)
    assert rec["images_trained"] == 12 and rec["warmup_steps"] == 1
    assert set(rec["phase_times"]) == {"data", "compute"}
    assert rec["train_throughput"] > 0 and rec["avg_batch_time"] > 0


def test_nan_loss_stops_with_a_clear_message():
    ctx = common.DistContext(0, 0, 1, 1, torch.device("cpu"), "gloo", True)
    loader = [(torch.randn(2, 3), torch.tensor([0, 1]))] * 2
    with pytest.raises(common.UserError, match="loss became nan"):
        common.run_epoch(ctx, _args(), 1, loader, 2, lambda x, y, c: (torch.tensor(float("nan")), torch.zeros(2, 2)))


def test_results_are_rewritten_atomically_with_status(tmp_path):
    ctx = common.DistContext(0, 0, 2, 2, torch.device("cpu"), "gloo", True)
    info = common.DataInfo("sample", "/x", 10, 100, 20, 32)
    path = tmp_path / "r.json"
    results = common.Results(path, "M", ctx, _args(), info, True, kind="k")
    assert json.loads(path.read_text())["status"] == "incomplete"
    record = {"epoch": 1, "train_loss": 1.0, "train_accuracy": 10.0, "train_time": 2.0, "train_throughput": 50.0,
              "avg_batch_time": 0.1, "avg_data_time": 0.01, "all_losses": [1.0, 1.5], "val_loss": 1.2,
              "val_accuracy": 12.0}
    results.add_epoch(record)
    data = json.loads(path.read_text())
    assert data["status"] == "incomplete" and len(data["epochs"]) == 1 and data["all_losses"] == [1.0, 1.5]
    assert data["summary"]["best_val_accuracy"] == 12.0 and data["summary"]["avg_train_throughput"] == 50.0
    results.add_epoch({**record, "epoch": 2, "val_accuracy": 20.0, "train_throughput": 70.0})
    results.finish()
    data = json.loads(path.read_text())
    assert data["status"] == "complete" and data["summary"]["avg_train_throughput"] == 60.0
    assert data["summary"]["best_val_accuracy"] == 20.0
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind
    assert "accuracy_note" not in data
    common.Results(tmp_path / "s.json", "M", ctx, _args(synthetic=True), info, True)
    assert "meaningless" in json.loads((tmp_path / "s.json").read_text())["accuracy_note"]


def test_output_folder_checked_before_training(tmp_path):
    with pytest.raises(common.UserError, match="does not exist"):
        common.check_output_path(tmp_path / "missing" / "r.json")
    common.check_output_path(tmp_path / "r.json")
