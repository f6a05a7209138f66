"""The from-scratch recipe on the built-in sample data: it learns (DDP, and PowerSGD near it); the three methods
apply the same learning rate at every step and, being the same math, train the same losses step by step, which
the analysis finds within the seed-to-seed spread of each other."""
import json
import math

import pytest

import analysis
import common
import modes
from dist_helpers import run_forked

# run_all.sh's first-run recipe (sample_recipe.env: 4 trainers x 32 images at --lr 0.1), on 2 trainers x 16 images,
# its learning rate scaled with the global batch (the linear scaling rule): 0.1 x 32 / 128.
RECIPE = modes.sample_recipe()["SAMPLE_RECIPE"] + [
    "--batch-size", "16", "--lr", "0.025", "--workers", "0", "--overhead-pairs", "0"]
# Learning takes whole epochs of the recipe's schedule: 3 (warm-up, then the cosine) of 20 steps, at 16 px (the short
# runs' size; 32 px and 30 steps an epoch learned alike, in 1.6 times the time), for DDP and for PowerSGD at rank 4,
# compressing after the warm-up epoch (20 plain steps; rank 1 compressing from step 3 lost 20 points of accuracy
# here), with the yardstick before epoch 1 (it must restore its state exactly). The other methods train the same
# losses as DDP step by step (the short runs below), so they would learn alike: their long runs at the recipe's full
# size are bench/RESULTS_recipe.md's.
LEARNING = {"ddp": ("baseline_multi_card.py", 2, 0, []),
            "ddp_powersgd": ("baseline_multi_card.py", 2, 0, ["--comm-hook", "powersgd", "--powersgd-rank", "4",
                                                               "--powersgd-warmup", "20", "--overhead-pairs", "1"])}
# The schedule and the same math need only its shape: 2 epochs (warm-up, then the cosine) of 4 steps, at 16 px.
SHORT = {"ddp": ("baseline_multi_card.py", 2, 0, []), "ddp_seed1": ("baseline_multi_card.py", 2, 1, []),
         "all_reduce": ("all_reduce_train.py", 2, 0, []), "ps": ("ps_train.py", 3, 0, [])}  # PS: 2 workers + a server


def _runs(folder, plan, *flags):
    out = {}
    for name, (script, nproc, seed, extra) in plan.items():
        path = folder / f"results_{name}.json"
        proc = run_forked(script, *RECIPE, *flags, "--seed", seed, *extra, "--output", path, nproc=nproc, cwd=folder,
                          timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = json.loads(path.read_text())
    return folder, out


@pytest.fixture(scope="module")
def learning(tmp_path_factory):
    return _runs(tmp_path_factory.mktemp("recipe"), LEARNING, "--epochs", "3", "--max-steps", "20",
                 "--image-size", "16")


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    return _runs(tmp_path_factory.mktemp("short"), SHORT, "--epochs", "2", "--max-steps", "4", "--image-size", "16")


def test_the_recipe_learns_and_its_loss_never_climbs_back(learning):
    """After the warm-up epoch the loss curve (per epoch, over all trainers) stays below its first value and falls;
    single batches of 16 images near chance level (ln 10 = 2.30) are noisy, so those may only not blow up: the
    issue's run went from 2.4 to 5.3 (2.2x); healthy runs reach 1.29x here and 1.44x over the whole recipe
    (bench/RESULTS_recipe.md)."""
    _, data = learning
    for name, d in data.items():
        losses = [e["train_loss"] for e in d["epochs"]]
        assert d["epochs"][-1]["val_accuracy"] >= 35.0, (name, [e["val_accuracy"] for e in d["epochs"]])  # 10% = chance
        assert losses[2] < losses[1] < losses[0] and losses[-1] < 0.8 * losses[0], (name, losses)
        after_warmup = d["all_losses"][len(d["epochs"][0]["all_losses"]):]  # --lr-warmup-epochs 1
        assert max(after_warmup) < 1.6 * d["all_losses"][0], (name, d["all_losses"])


def test_the_three_methods_apply_the_same_learning_rate_at_every_step(short):
    _, data = short
    args = data["ddp"]["args"]
    expected = [lr for e in data["ddp"]["epochs"] for lr in e["lrs"]]
    steps = data["ddp"]["steps_per_epoch"]
    schedule = [common.lr_at(type("A", (), args), e + s / steps) for e in range(2) for s in range(steps)]
    assert expected == pytest.approx(schedule, rel=1e-12) and expected[0] < expected[steps] > expected[-1]
    for name, d in data.items():  # the PS's are the server's own
        assert [lr for e in d["epochs"] for lr in e["lrs"]] == expected, name


def test_same_math_methods_train_the_same_losses_within_the_seed_to_seed_spread(short):
    folder, data = short
    for name in ("all_reduce", "ps"):  # the same seed: the same batches, the same averaged gradients
        assert data[name]["all_losses"] == pytest.approx(data["ddp"]["all_losses"], rel=1e-4), name
    assert data["ddp_seed1"]["all_losses"] != pytest.approx(data["ddp"]["all_losses"], rel=1e-3)
    experiments, skipped = analysis.load_folder(folder)
    assert not skipped and sorted(len(x.runs) for x in experiments) == [1, 1, 2]
    lines = analysis.report.convergence_lines(experiments)
    for method in ("Manual All-Reduce (overlap)", "Parameter Server (collective) [3 proc]"):
        line = next(x for x in lines if x.startswith(f"- Loss curves: {method}"))
        assert "within the seed-to-seed spread" in line and "they agree" in line, line
    assert not any(math.isnan(x.mean("throughput")) for x in experiments)


def test_powersgd_learns_near_the_uncompressed_run(learning):
    """Compressed to ~1.4% of the bytes after the warm-up epoch, PowerSGD learns like the plain all-reduce."""
    _, data = learning
    plain, compressed = data["ddp"], data["ddp_powersgd"]
    assert compressed["comm_hook"] == "powersgd" and "comm_overhead" in compressed
    assert compressed["wire_bytes_per_step"] < 0.05 * plain["wire_bytes_per_step"]
    steps = plain["steps_per_epoch"]  # the warm-up epoch is plain all-reduces, after the yardstick restored all
    assert compressed["all_losses"][:steps] == pytest.approx(plain["all_losses"][:steps], rel=1e-6)
    losses = [[e["train_loss"] for e in d["epochs"]] for d in (plain, compressed)]
    assert losses[1][2] < losses[1][1] < losses[1][0] and abs(losses[1][2] - losses[0][2]) < 0.15 * losses[0][2], losses
