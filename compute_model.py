"""--compute-model: the target's physics on a CPU testbed. Each layer's forward and backward take the time a named
device would take, spent as a wait (time.sleep, so the host CPU stays free for communication, as it is beside a
GPU), while everything else is real: the real model and autograd run on a small proxy input (PROXY_BATCH images of
PROXY_SIZE px), so gradient hooks fire in backward's real order with the real gradient shapes and bytes, and the
communication, the optimizer step and every method's code run unchanged.

Where each layer's time comes from (the SPEC of --compute-model):
    flops:TFLOPS     torch's own FLOP counter (torch.utils.flop_counter) at the run's batch and image size, at an
                     effective TFLOPS (sustained, not peak) of the modeled device; convolutions and matmuls only, so
                     normalization and elementwise layers cost nothing in this model.
    PROFILE.json     a profile recorded by this file on a real device (CUDA events around each layer, or the CPU's
                     perf_counter), for one arch, batch and image size:
                         python compute_model.py --arch resnet50 --batch-size 64 --image-size 224 --amp \\
                             --output profiles/resnet50_b64_224_bf16_<device>.json

A layer's backward is charged when its first parameter's gradient is computed (before that gradient reaches any
synchronization hook); the backward of a layer without parameters (ReLU, pooling) is folded into the layer with
parameters before it in forward order, whose gradients autograd computes right after it. Time between layers
(residual adds, flatten) is spread over the layers in proportion to their own. Real time a layer spends on the
proxy counts against its modeled time, and an oversleep is paid back by the next layer, so a step's modeled
compute is the profile's within the sleep's resolution.
"""
import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import UserError

PROXY_BATCH = 2  # the fewest images BatchNorm trains on when the last feature map is 1x1
PROXY_SIZE = 32  # pixels: the smallest size torchvision's CNNs keep a valid feature map at
MIN_SLEEP = 2e-4  # seconds owed before a layer sleeps at all (less is carried to the next layer)


def leaves(model):
    """[(name, module)] of the modules without children, in registration order."""
    return [(name, m) for name, m in model.named_modules() if not any(True for _ in m.children())]


def owners(model):
    """[(name, module)] of the modules that hold parameters of their own, in registration order (a tied parameter
    belongs to the first)."""
    seen, out = set(), []
    for name, m in model.named_modules():
        own = [p for p in m.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in own)
        if own:
            out.append((name, m))
    return out


def fold_backward(model, backward):
    """{owner name: seconds}: each module's backward time moved to the owner of parameters before it in
    registration order (its own when it owns parameters), where autograd charges it (see the docstring)."""
    owner_names = {name for name, _ in owners(model)}
    folded, current = {name: 0.0 for name in owner_names}, None
    for name, _ in model.named_modules():
        if name in owner_names:
            current = name
        if current is not None:
            folded[current] += backward.get(name, 0.0)
    return folded


def spread(parts, total):
    """`parts` scaled so they sum to `total` (the time between them shared in proportion to their own)."""
    own = sum(parts.values())
    if own <= 0:
        return {k: total / max(1, len(parts)) for k in parts}
    return {k: v * total / own for k, v in parts.items()}


# --------------------------------------------------------------------------- the two sources
def flops_profile(model, batch_size, image_size, tflops, channels_last=False):
    """A profile from torch's FLOP counter: forward and backward FLOPs per layer at `batch_size` x `image_size`,
    counted on the meta device (no memory, no compute), at `tflops` effective TFLOP/s."""
    from torch.utils.flop_counter import FlopCounterMode
    meta = copy.deepcopy(model).to("meta").train()
    x = torch.empty(batch_size, 3, image_size, image_size, device="meta")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    calls = layer_calls(meta, x)
    counts = []
    for with_backward in (False, True):
        counter = FlopCounterMode(display=False, depth=None)
        with counter:
            out = meta(x)
            if with_backward:
                out.float().sum().backward()
        counts.append({k.split(".", 1)[1] if "." in k else "": sum(v.values())
                       for k, v in counter.get_flop_counts().items() if k != "Global"})
    total = [c.get("", 0) for c in counts]  # the root module's count: the whole model's
    rate = tflops * 1e12
    fwd = {name: counts[0].get(name, 0) / rate for name, _ in leaves(model)}
    own_fwd = _own(model, counts[0])
    # torch's counter counts a grouped convolution's backward as a dense one's (x groups): a layer's backward is at
    # most its gradient for the input and for the weights, twice its forward.
    bwd = {name: min(2 * own_fwd[name], own) for name, own in _own(
        model, {name: counts[1].get(name, 0) - counts[0].get(name, 0) for name, _ in model.named_modules()}).items()}
    total[1] = total[0] + sum(bwd.values())
    return {"kind": "flops", "spec": f"flops:{tflops:g}", "device": f"modeled: {tflops:g} effective TFLOP/s",
            "measured_with": "torch.utils.flop_counter (convolutions and matmuls)", "batch_size": batch_size,
            "image_size": image_size, "calls": calls, "forward_s": total[0] / rate, "backward_s": (total[1] - total[0]) / rate,
            "forward": spread(fwd, total[0] / rate),
            "backward": spread({k: v / rate for k, v in fold_backward(model, bwd).items()},
                               (total[1] - total[0]) / rate)}


def layer_calls(model, x):
    """{layer name: times it runs in one forward of `x`}."""
    calls, handles = {}, []
    for name, m in leaves(model):
        handles.append(m.register_forward_hook(
            lambda mod, a, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1)))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return calls


def _own(model, counts):
    """A module's count less its children's: what its own code did (a leaf's is all of it)."""
    out = {}
    for name, m in model.named_modules():
        children = sum(counts.get(f"{name}.{c}" if name else c, 0) for c, _ in m.named_children())
        out[name] = max(0, counts.get(name, 0) - children)
    return out


def load_profile(path, model, args, image_size):
    """A recorded profile, checked against this run: the same arch, batch and image size, every layer named."""
    try:
        profile = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"--compute-model {path}: no such profile (record one with python compute_model.py, or "
                        "use flops:TFLOPS)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"--compute-model {path} is not a compute profile ({e})") from None
    if not isinstance(profile, dict) or profile.get("kind") != "profile":
        raise UserError(f"--compute-model {path} is not a compute profile (record one with python compute_model.py)")
    for key, mine in (("arch", args.arch), ("batch_size", args.batch_size), ("image_size", image_size)):
        if profile.get(key) != mine:
            raise UserError(f"--compute-model {path} was measured with {key} {profile.get(key)}, this run has "
                            f"{mine} (run with the profile's settings, or record one at yours)")
    missing = [name for name, _ in leaves(model) if name not in profile["forward"]]
    if missing:
        raise UserError(f"--compute-model {path} has no time for layer {missing[0]} of this model "
                        f"({len(missing)} missing; record the profile with this --arch)")
    profile["spec"] = str(path)
    return profile


def resolve(spec, model, args, image_size):
    """The profile that `spec` (flops:TFLOPS or a profile file) names, for this run."""
    if spec.startswith("flops:"):
        try:
            tflops = float(spec.split(":", 1)[1])
        except ValueError:
            tflops = 0.0
        if not tflops > 0:
            raise UserError(f"--compute-model {spec}: expected flops:TFLOPS with a positive number (e.g. flops:50)")
        return flops_profile(model, args.batch_size, image_size, tflops, args.channels_last)
    return load_profile(spec, model, args, image_size)


# --------------------------------------------------------------------------- playing a profile back
class ComputeModel:
    """Installed on a model after every other hook (a method's waits in forward pre-hooks and its gradient hooks come
    first, so they are never charged as compute): spends the profile's time per layer in training steps (not in
    evaluation, under no_grad). `inputs()` makes a batch the proxy the real model runs on; each proxy image counts as
    `weight` images, so throughput is in modeled images."""

    def __init__(self, profile, model, args):
        self.profile, self.args = profile, args
        self.weight = args.batch_size / min(args.batch_size, PROXY_BATCH)
        self.credit, self.t0, self.mark, self.charged = 0.0, 0.0, 0.0, set()
        self.steps, self.modeled, self.played, self.step_start = 0, 0.0, 0.0, None
        model.register_forward_pre_hook(self._new_step)
        model.register_forward_hook(self._end_forward)
        for name, m in leaves(model):
            m.register_forward_pre_hook(self._layer_start)
            t = profile["forward"][name] / max(1, profile.get("calls", {}).get(name, 1))  # per call
            m.register_forward_hook(lambda mod, a, out, t=t: self._layer_end(t))
        backward = profile["backward"]
        for name, m in owners(model):
            for p in m.parameters(recurse=False):
                if p.requires_grad:
                    p.register_hook(lambda g, key=name, t=backward.get(name, 0.0): self._grad(key, t, g))
                    p.register_post_accumulate_grad_hook(self._after_grad)

    @staticmethod
    def _active():
        return torch.is_grad_enabled()

    def _new_step(self, module, args):
        if not self._active() or not module.training:
            return
        if self.step_start is not None:  # the previous step's modeled compute ended with its last layer
            self.played += self.mark - self.step_start
        self.charged, self.credit = set(), 0.0
        self.steps += 1
        self.modeled += self.profile["forward_s"] + self.profile["backward_s"]
        self.step_start = time.perf_counter()

    def _pay(self, modeled, spent):
        """Sleeps what is owed: this layer's modeled time less the real time it took, plus what earlier layers owe."""
        self.credit += modeled - spent
        if self.credit >= MIN_SLEEP:
            start = time.perf_counter()
            time.sleep(self.credit)
            self.credit -= time.perf_counter() - start
        self.mark = time.perf_counter()

    def _layer_start(self, module, args):
        self.t0 = time.perf_counter()

    def _layer_end(self, modeled):
        if self._active():
            self._pay(modeled, time.perf_counter() - self.t0)

    def _end_forward(self, module, args, out):
        if self._active() and module.training:
            self.mark = time.perf_counter()  # backward's first layer is charged from here

    def _grad(self, key, modeled, grad):
        if key not in self.charged:
            self.charged.add(key)
            self._pay(modeled, time.perf_counter() - self.mark)
        return None

    def _after_grad(self, param):
        self.mark = time.perf_counter()  # the sync's own hooks ran before this one: they are not compute

    def inputs(self, images, targets):
        """The proxy batch the real model runs on: the first PROXY_BATCH images, at PROXY_SIZE px."""
        images, targets = images[:PROXY_BATCH], targets[:PROXY_BATCH]
        if images.shape[-1] > PROXY_SIZE:
            fmt = torch.channels_last if self.args.channels_last else torch.contiguous_format
            images = F.interpolate(images, size=PROXY_SIZE, mode="nearest").contiguous(memory_format=fmt)
        return images, targets

    def summary(self):
        """The results JSON's `compute_model` block."""
        p = self.profile
        return {"kind": p["kind"], "spec": p["spec"], "label": label(p), "device": p.get("device"),
                "measured_with": p.get("measured_with"), "dtype": p.get("dtype"),
                "modeled_batch": self.args.batch_size, "modeled_image_size": p["image_size"],
                "proxy_batch": min(self.args.batch_size, PROXY_BATCH), "proxy_image_size": PROXY_SIZE,
                "modeled_compute_per_step": p["forward_s"] + p["backward_s"],
                "modeled_forward_per_step": p["forward_s"], "modeled_backward_per_step": p["backward_s"],
                "played_compute_per_step": self.played / max(1, self.steps - 1) if self.steps > 1 else None,
                "note": "forward and backward are modeled (a wait per layer, the host CPU free); the proxy input's "
                        "loss and accuracy are meaningless; communication, optimizer step and data are real"}


def label(profile):
    """How every table and sentence names a run of this profile."""
    if profile["kind"] == "flops":
        return f"modeled compute ({profile['spec']}: FLOPs at {profile['spec'][6:]} effective TFLOP/s)"
    return f"modeled compute (profile of {profile.get('device')}, {profile.get('dtype')})"


ACCURACY_NOTE = ("modeled compute (--compute-model): the model trained on a 2-image proxy, so loss and accuracy are "
                 "meaningless")


def setup(args, ctx, info, model, results=None):
    """The ComputeModel that --compute-model asks for on `model` (None without the flag), its summary and the
    accuracy note in `results`."""
    spec = getattr(args, "compute_model", None)
    if not spec:
        return None
    if ctx.device.type == "cuda":
        raise UserError("--compute-model models a device's compute on the CPU; on a GPU the compute is real "
                        "(drop the flag, or use --backend gloo)")
    compute = ComputeModel(resolve(spec, model, args, info.image_size), model, args)
    torch.set_num_threads(1)  # the proxy's compute is small: no OpenMP threads spinning on comm's cores
    if results is not None:
        results.update(compute_model=compute.summary(), accuracy_note=ACCURACY_NOTE)
    return compute


# --------------------------------------------------------------------------- recording a profile
def record(model, batch_size, image_size, device, num_classes, steps=20, warmup=5, amp_dtype=None,
           channels_last=False):
    """Each layer's forward and backward time on `device`, median over `steps` steps after `warmup` (CUDA events
    there, perf_counter on a CPU); backward as the time between gradients, charged as playback charges it."""
    cuda = device.type == "cuda"
    stamp = _event if cuda else time.perf_counter
    marks = {"forward": {}, "backward": {}}

    def first_gradient(name):
        if name not in marks["backward"]:
            marks["backward"][name] = stamp()

    for name, m in leaves(model):  # a layer may run several times a forward (ResNet's one ReLU three times)
        m.register_forward_pre_hook(lambda mod, a, name=name: marks["forward"].setdefault(name, []).append(stamp()))
        m.register_forward_hook(lambda mod, a, o, name=name: marks["forward"][name].append(stamp()))
    for name, m in owners(model):
        for p in m.parameters(recurse=False):
            p.register_hook(lambda g, name=name: first_gradient(name))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    model.to(device, memory_format=fmt).train()
    samples, calls = {"forward": {}, "backward": {}, "forward_s": [], "backward_s": []}, {}
    for step in range(warmup + steps):
        marks["forward"].clear()
        marks["backward"].clear()
        model.zero_grad(set_to_none=True)
        start = stamp()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        mid = stamp()
        loss.backward()
        end = stamp()
        if cuda:
            torch.cuda.synchronize(device)
        if step < warmup:
            continue
        secs = (lambda a, b: a.elapsed_time(b) / 1e3) if cuda else (lambda a, b: b - a)
        samples["forward_s"].append(secs(start, mid))
        samples["backward_s"].append(secs(mid, end))
        for name, stamps in marks["forward"].items():
            samples["forward"].setdefault(name, []).append(sum(secs(a, b) for a, b in zip(stamps[::2], stamps[1::2])))
            calls[name] = len(stamps) // 2
        order = sorted(marks["backward"].items(), key=lambda kv: secs(mid, kv[1]))
        previous = mid
        for name, t in order:
            samples["backward"].setdefault(name, []).append(secs(previous, t))
            previous = t
    med = statistics.median
    fwd_total, bwd_total = med(samples["forward_s"]), med(samples["backward_s"])
    return {"forward_s": fwd_total, "backward_s": bwd_total, "calls": calls,
            "forward": spread({k: med(v) for k, v in samples["forward"].items()}, fwd_total),
            "backward": spread({k: med(v) for k, v in samples["backward"].items()}, bwd_total)}


def _event():
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def main(argv=None):
    """The command line that records a profile."""
    from torchvision import models
    p = argparse.ArgumentParser(description="Record a compute profile for --compute-model (per-layer forward and "
                                            "backward times of one training step on this machine's device).")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--amp", action="store_true", help="autocast (see --amp-dtype)")
    p.add_argument("--amp-dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20, help="timed steps (after 5 untimed)")
    p.add_argument("--output", required=True, help="the profile JSON to write")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = models.get_model(args.arch, weights=None, num_classes=args.num_classes)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.amp_dtype] if args.amp else None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    times = record(model, args.batch_size, args.image_size, device, args.num_classes, steps=args.steps, amp_dtype=dtype,
                   channels_last=args.channels_last)
    from common import device_name
    profile = {"kind": "profile", "arch": args.arch, "batch_size": args.batch_size, "image_size": args.image_size,
               "num_classes": args.num_classes, "dtype": args.amp_dtype if args.amp else "fp32",
               "channels_last": args.channels_last, "device": device_name(device),
               "measured_with": "CUDA events" if device.type == "cuda" else "time.perf_counter",
               "torch_version": str(torch.__version__), "steps": args.steps,
               "recorded": time.strftime("%Y-%m-%d %H:%M:%S"), **times}
    Path(args.output).write_text(json.dumps(profile, indent=1))
    print(f"{args.arch} batch {args.batch_size} at {args.image_size} px, {profile['dtype']}, on {profile['device']}: "
          f"forward {1e3 * times['forward_s']:.1f} ms, backward {1e3 * times['backward_s']:.1f} ms -> {args.output}")


if __name__ == "__main__":
    sys.exit(main())
