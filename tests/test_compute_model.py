"""--compute-model: layers take the modeled time as waits (the host CPU free), gradient hooks fire at the modeled
times, the math is unchanged, profiles are recorded and checked, bad specs are one line."""
import json
import time
import types

import pytest
import torch
import torch.nn.functional as F
import torchvision

import compute_model as cm
from common import UserError
from dist_helpers import FAST_ARGS, one_error_line, run_forked


def _model(arch="resnet18"):
    torch.manual_seed(0)
    return torchvision.models.get_model(arch, num_classes=10)


def test_flops_profile_adds_up_and_caps_grouped_backward():
    model = _model("mobilenet_v3_small")
    p = cm.flops_profile(model, 64, 224, 10.0)
    assert sum(p["forward"].values()) == pytest.approx(p["forward_s"], rel=1e-9)
    assert sum(p["backward"].values()) == pytest.approx(p["backward_s"], rel=1e-9)
    # forward FLOPs at batch 64 x 224 px (MobileNetV3-small: ~0.06 GMAC an image) at 10 TFLOP/s
    assert 0.4e-3 < p["forward_s"] < 1.2e-3
    # torch's counter counts a depthwise convolution's backward x groups; the model keeps it <= 2x forward
    assert p["forward_s"] < p["backward_s"] <= 2 * p["forward_s"] + 1e-12
    assert set(p["backward"]) == {name for name, _ in cm.owners(model)}
    assert p["calls"]["features.0.0"] == 1


@pytest.mark.alone  # compares times: the other worker waits (conftest.py)
def test_playback_takes_the_modeled_time_with_the_cpu_idle_and_hooks_at_modeled_times():
    torch.set_num_threads(1)
    model = _model()
    arrivals = {}  # a sync's gradient hooks come first, as in the scripts: they see the modeled backward
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _, name=name: arrivals.update({name: time.perf_counter()}))
    profile = cm.flops_profile(model, 64, 224, 1.0)  # ~0.34 s a step: the proxy's real compute is a few % of it
    modeled = profile["forward_s"] + profile["backward_s"]
    cmodel = cm.ComputeModel(profile, model, types.SimpleNamespace(batch_size=64, channels_last=False))
    x, y = cmodel.inputs(torch.randn(64, 3, 224, 224), torch.randint(0, 10, (64,)))
    assert x.shape == (2, 3, 32, 32) and cmodel.weight == 32
    for step in range(3):
        arrivals.clear()
        model.zero_grad()
        start, cpu = time.perf_counter(), time.process_time()
        F.cross_entropy(model(x), y).backward()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert wall == pytest.approx(modeled, rel=0.05, abs=0.005)
    assert cpu < 0.35 * wall, (cpu, wall)  # waits, not a busy loop
    # the head's gradient arrives after the whole forward and its own backward; conv1's at the very end
    assert arrivals["fc.weight"] - start >= profile["forward_s"] + profile["backward"]["fc"] - 0.002
    assert arrivals["conv1.weight"] - start == pytest.approx(modeled, rel=0.05, abs=0.005)
    with torch.no_grad():  # evaluation is not modeled
        start = time.perf_counter()
        model.eval()(x)
        assert time.perf_counter() - start < 0.2 * profile["forward_s"]


def _run(folder, script, *flags, nproc=2):
    out = folder / f"{script.split('.')[0]}-{len(list(folder.iterdir()))}.json"
    proc = run_forked(script, *FAST_ARGS, "--synthetic", "--batch-size", "2", "--max-steps", "3",
                      "--output", out, *flags, nproc=nproc, cwd=folder, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("script,flags,nproc", [("baseline_multi_card.py", [], 2),
                                                ("all_reduce_train.py", ["--sync", "pipelined"], 2),
                                                ("ps_train.py", [], 3)])
def test_same_math_with_and_without_the_model(tmp_path, script, flags, nproc):
    """At the proxy's own size (2 images of 16 px) the model only adds time: the same losses, bit for bit."""
    real = _run(tmp_path, script, *flags, nproc=nproc)
    modeled = _run(tmp_path, script, *flags, "--compute-model", "flops:0.05", "--overhead-pairs", "1", nproc=nproc)
    assert modeled["all_losses"] == real["all_losses"]
    assert modeled["epochs"][0]["val_loss"] == real["epochs"][0]["val_loss"]
    c = modeled["compute_model"]
    assert real.get("compute_model") is None and c["kind"] == "flops" and c["proxy_batch"] == 2
    assert "modeled compute" in c["label"] and "meaningless" in modeled["accuracy_note"]
    # resnet18 at batch 2 x 16 px: 0.15 GFLOP a step, so 3 ms at 0.05 TFLOP/s; the compute phase holds it
    assert 2e-3 < c["modeled_compute_per_step"] < 5e-3
    assert modeled["epochs"][0]["phase_times"]["compute"] >= 0.9 * c["modeled_compute_per_step"]
    assert modeled["comm_overhead"]["local_step_time"] >= c["modeled_compute_per_step"]


def test_recorded_profile_plays_back_and_is_checked(tmp_path):
    path = tmp_path / "p.json"
    cm.main(["--arch", "resnet18", "--batch-size", "2", "--image-size", "16", "--num-classes", "10", "--steps", "2",
             "--device", "cpu", "--output", str(path)])
    profile = json.loads(path.read_text())
    model = _model()
    assert profile["kind"] == "profile" and profile["measured_with"] == "time.perf_counter"
    assert set(profile["forward"]) == {name for name, _ in cm.leaves(model)}
    assert set(profile["backward"]) == {name for name, _ in cm.owners(model)}
    assert sum(profile["backward"].values()) == pytest.approx(profile["backward_s"], rel=1e-9)
    assert profile["calls"]["layer1.0.relu"] == 2  # one ReLU module, run twice in a BasicBlock
    data = _run(tmp_path, "all_reduce_train.py", "--compute-model", path, nproc=1)
    assert data["compute_model"]["kind"] == "profile" and data["compute_model"]["device"].startswith("cpu")
    args = types.SimpleNamespace(arch="resnet18", batch_size=4, channels_last=False)
    with pytest.raises(UserError, match="batch_size 2, this run has 4"):
        cm.resolve(str(path), model, args, 16)


def test_bad_specs_are_one_line(tmp_path):
    args = types.SimpleNamespace(arch="resnet18", batch_size=2, channels_last=False)
    for spec, says in (("flops:0", "positive number"), ("flops:fast", "positive number"),
                       (str(tmp_path / "none.json"), "no such profile")):
        with pytest.raises(UserError, match=says):
            cm.resolve(spec, _model(), args, 16)
    (tmp_path / "x.json").write_text('{"kind": "results"}')
    proc = run_forked("baseline_multi_card.py", *FAST_ARGS, "--synthetic", "--compute-model", tmp_path / "x.json",
                      "--output", tmp_path / "r.json", cwd=tmp_path)
    assert "is not a compute profile" in one_error_line(proc, code=2)
