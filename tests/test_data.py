"""data.py: the built-in sample dataset, the choice of data, sharding (a last batch of one image is dropped),
--synthetic batches, and exact distributed validation."""
import json

import pytest
import torch

import common
import data
import measure
from dist_helpers import FAST_ARGS, cli_args as _args, cpu_ctx as _ctx, make_image_folder, run_forked, run_in_group


# --------------------------------------------------------------------------- the sample dataset
def test_data_py_generates_the_sample_set_deterministically_once(tmp_path):
    proc = run_forked("data.py", "--root", tmp_path / "a", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = tmp_path / "a"  # --root DIR writes DIR/train and DIR/val, so that --data-dir DIR reads it
    assert f"sample dataset: {first}" in proc.stdout
    second = data.ensure(tmp_path / "b")  # the same, generated in this process into the scripts' versioned cache
    assert second == tmp_path / "b" / data.VERSION
    files = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    assert len(files) == len(data.CLASSES) * (data.TRAIN_PER_CLASS + data.VAL_PER_CLASS)
    assert len(list((first / "train").rglob("*.png"))) == len(data.CLASSES) * data.TRAIN_PER_CLASS
    assert sorted(p.name for p in (first / "val").iterdir()) == [f"{i}_{c}" for i, c in enumerate(data.CLASSES)]
    assert files == sorted(p.relative_to(second) for p in second.rglob("*.png"))
    for rel in files[:: len(files) // 7]:
        assert (first / rel).read_bytes() == (second / rel).read_bytes()
    mtime = (first / files[0]).stat().st_mtime
    assert data.ensure(tmp_path / "a", versioned=False) == first  # cached: not regenerated
    assert (first / files[0]).stat().st_mtime == mtime
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["train", "val"]  # no temporary folder left


def test_sample_classes_are_distinguishable():
    """Learnable: a nearest-class-mean classifier on raw pixels beats chance clearly (10% for 10 classes)."""
    import numpy as np
    rng = np.random.default_rng(0)
    feats = lambda img: np.abs(np.fft.fft2(img.mean(-1) - img.mean())).ravel()[:300]  # placement-invariant
    train = [(feats(data.sample_image(c, rng, 48).astype(float)), c) for c in range(10) for _ in range(30)]
    test = [(feats(data.sample_image(c, rng, 48).astype(float)), c) for c in range(10) for _ in range(10)]
    means = np.stack([np.mean([f for f, c in train if c == k], 0) for k in range(10)])
    acc = np.mean([np.argmin(((means - f) ** 2).sum(1)) == c for f, c in test])
    assert acc > 0.3


# --------------------------------------------------------------------------- which data, how much of it
def test_resolve_data_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert data.resolve_data(_args()) == ("sample", None)  # nothing given, no ./train
    with pytest.raises(common.UserError, match="does not exist"):
        data.resolve_data(_args(data_dir=str(tmp_path / "nope")))
    (tmp_path / "d" / "train").mkdir(parents=True)
    with pytest.raises(common.UserError, match="val"):
        data.resolve_data(_args(data_dir=str(tmp_path / "d")))
    (tmp_path / "d" / "val").mkdir()
    assert data.resolve_data(_args(data_dir=str(tmp_path / "d")))[0] == "imagefolder"
    (tmp_path / "train").mkdir()
    with pytest.raises(common.UserError, match="./val is missing"):
        data.resolve_data(_args())
    (tmp_path / "val").mkdir()
    assert data.resolve_data(_args()) == ("imagefolder", type(tmp_path)("."))  # the guide's default ./


@pytest.fixture(scope="module")
def twenty(tmp_path_factory):
    """2 classes x 10 training images, 2 x 1 validation images."""
    return make_image_folder(tmp_path_factory.mktemp("twenty"), classes=2, train_per_class=10, val_per_class=1,
                             size=12)


def test_open_data_rejects_batch_larger_than_shard(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=2, train_per_class=4, val_per_class=1)
    with pytest.raises(common.UserError, match="larger than the 4 training images"):
        data.open_data(_args(data_dir=str(root), batch_size=5), _ctx(), 2)


@pytest.mark.parametrize("replicas,batch,steps,dropped", [
    (2, 4, 3, False),  # shards of 10: 4 + 4 + 2
    (2, 3, 3, True),  # shards of 10: 3 + 3 + 3, the 10th image alone is dropped
    (1, 19, 1, True),  # 20 = 19 + 1
    (1, 10, 2, False),
    (3, 2, 3, True),  # 20 over 3: shards of 7 (the sampler pads), 2 + 2 + 2 and a dropped 7th
])
def test_steps_and_the_dropped_single_image(twenty, replicas, batch, steps, dropped):
    """A shard whose last batch would hold one image drops it (BatchNorm cannot train on one image); the
    loader then gives exactly `steps` batches, none of them of one image."""
    args = _args(data_dir=str(twenty), batch_size=batch, image_size=8, workers=0)
    ds = data.open_data(args, _ctx(), replicas)
    assert (ds.info.steps, ds.info.dropped_last_image) == (steps, dropped)
    assert (ds.info.train_size, ds.info.val_size, ds.info.num_classes) == (20, 2, 2)
    for rank in range(replicas):
        sizes = [len(targets) for _, targets in data.train_loader(ds, args, _ctx(), replicas, rank)]
        assert len(sizes) == steps and min(sizes) > 1, sizes
    assert data.open_data(_args(data_dir=str(twenty), batch_size=batch, max_steps=1), _ctx(), replicas).info.steps == 1


def test_synthetic_loader_gives_the_real_step_count(twenty):
    args = _args(data_dir=str(twenty), batch_size=4, synthetic=True, image_size=8)
    ds = data.open_data(args, _ctx(), 2)
    train = data.train_loader(ds, args, _ctx(), 2, 0)
    assert ds.info.steps == 3 and len(train) == 3  # 20 images over 2 replicas, batch 4
    batches = list(train)
    assert len(batches) == 3 and batches[0][0].shape == (4, 3, 8, 8) and batches[0][1].shape == (4,)
    assert "synthetic" in ds.info.name
    other = list(data.train_loader(ds, args, _ctx(), 2, 1))[0][0]
    assert not torch.equal(other, batches[0][0])  # each replica its own batch


def test_to_device_channels_last():
    images, targets = data.to_device(torch.randn(2, 3, 4, 4), torch.tensor([0, 1]), _ctx(),
                                     _args(channels_last=True))
    assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()


def test_a_last_batch_of_one_image_is_dropped_not_a_batchnorm_crash(tmp_path):
    """9 training images, batch 4, one process: 4 + 4 and a lone 9th image, which BatchNorm cannot train on
    ("Expected more than 1 value per channel when training"): it is dropped and said so."""
    root = make_image_folder(tmp_path / "nine", classes=3, train_per_class=3, val_per_class=1)
    out = tmp_path / "r.json"
    proc = run_forked("baseline_multi_card.py", *FAST_ARGS, "--data-dir", root, "--output", out, cwd=tmp_path,
                      timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Expected more than 1 value per channel" not in proc.stderr
    result = json.loads(out.read_text())
    assert result["status"] == "complete" and result["dataset"]["train_size"] == 9
    assert result["dataset"]["dropped_last_image"] is True and result["steps_per_epoch"] == 2
    assert result["epochs"][0]["images_trained"] == 8


# --------------------------------------------------------------------------- exact validation
def _eval_sharded(rank, world_size, root, group=None):
    """Evaluates a seeded tiny model on `root`'s val set sharded over the group, and on the whole set alone."""
    args = _args(data_dir=root, arch="resnet18", image_size=16, batch_size=2, workers=0)
    ctx = _ctx(rank, world_size)
    ds = data.open_data(args, ctx, world_size)
    val = data.val_loader(ds, args, ctx, world_size, rank)
    model, _ = common.build_model(args, ctx, ds.info.num_classes)
    sharded = measure.evaluate(model, val, ctx, args, group=group)
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


def _eval_in_groups_of_4_and_2(rank, world_size, root):
    import torch.distributed as dist
    out = {4: _eval_sharded(rank, 4, root)}
    pair = dist.new_group([0, 1])  # every rank must call new_group
    if rank < 2:
        out[2] = _eval_sharded(rank, 2, root, group=pair)
    return out


@pytest.fixture(scope="module")
def sharded_eval(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("eval"), classes=3, train_per_class=8, val_per_class=3)
    return run_in_group(_eval_in_groups_of_4_and_2, 4, str(root))  # 9 val images: 4 and 2 do not divide it


@pytest.mark.parametrize("world_size", [2, 4])
def test_distributed_eval_is_exact_when_the_sampler_would_pad(sharded_eval, world_size):
    out = [o[world_size] for o in sharded_eval[:world_size]]
    assert sum(o[2] for o in out) == 9  # shards cover the set exactly once, no padding
    for sharded, single, _ in out:
        assert sharded[0] == pytest.approx(single[0], rel=1e-5)
        assert sharded[1] == pytest.approx(single[1])


def test_shard_sampler_covers_each_index_once():
    shards = [list(data.ShardSampler(10, 4, r)) for r in range(4)]
    assert sorted(i for s in shards for i in s) == list(range(10)) and [len(s) for s in shards] == [3, 3, 2, 2]


def _batches(root, workers, start=0, epoch=3):
    ds = data.open_data(_args(data_dir=str(root), batch_size=4, workers=workers), _ctx(), 1)
    loader = data.train_loader(ds, _args(batch_size=4, workers=workers, seed=7), _ctx(), 2, 1)
    loader.sampler.set_epoch(epoch)
    loader.sampler.start = start * 4
    return [images for images, _ in loader]


def test_an_epoch_sees_the_same_images_with_any_workers_and_from_any_step(twenty):
    """Each sample's augmentation has its own seed (run, epoch, index): the images do not depend on which
    DataLoader worker loads them, nor on where the epoch starts (a restart mid-epoch), nor on the caller's RNG."""
    torch.manual_seed(1)
    plain = _batches(twenty, workers=0)
    before = torch.get_rng_state()
    assert all(torch.equal(a, b) for a, b in zip(plain, _batches(twenty, workers=2)))
    assert torch.equal(before, torch.get_rng_state())  # the caller's RNG is left as it was
    tail = _batches(twenty, workers=0, start=1)
    assert len(tail) == len(plain) - 1 and all(torch.equal(a, b) for a, b in zip(plain[1:], tail))
    assert not torch.equal(plain[0], _batches(twenty, workers=0, epoch=4)[0])  # another epoch, other images


def _synthetic_notice(rank, world_size):
    import contextlib
    import io
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        data.open_data(_args(synthetic=True), _ctx(), 1)
    return text.getvalue()


def test_a_synthetic_run_says_it_trains_on_random_batches():
    text, = run_in_group(_synthetic_notice, 1)
    assert "--synthetic: random batches" in text and "using the built-in sample dataset" not in text
