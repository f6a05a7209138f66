"""common.py: the command line and its one-line errors, distributed setup, the model and its learning-rate
schedule, flat buffers."""
import datetime
import os
import uuid

import pytest
import torch
import torch.distributed as dist

import all_reduce_train
import baseline_multi_card
import common
import measure
import modes
import ps_train
from dist_helpers import Forked, cli_args as _args, cpu_ctx as _ctx, run_in_group

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- command line
PARSERS = {"baseline": baseline_multi_card.parse_args, "all_reduce": all_reduce_train.parse_args,
           "ps": ps_train.parse_args}


@pytest.mark.parametrize("script", PARSERS)
@pytest.mark.parametrize("argv", [["--out", "x.json"], ["--epoch", "2"], ["--batch", "8"]],
                         ids=["--out", "--epoch", "--batch"])
def test_an_abbreviated_flag_is_one_error_line(capsys, script, argv):
    """`--out x.json` is not --output (no silent write to the default file): one `error:` line, exit 2."""
    with pytest.raises(SystemExit) as exit_info:
        PARSERS[script](argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unrecognized arguments: " + argv[0]), captured.err
    assert "--help" in lines[0] and captured.out == ""
    full = {"--out": "--output", "--epoch": "--epochs", "--batch": "--batch-size"}[argv[0]]
    assert str(getattr(PARSERS[script]([full, argv[1]]), full[2:].replace("-", "_"))) == argv[1]  # spelled out


def test_variant_outputs():
    assert modes.variant_output("ps", "collective", "collective") == "results_ps.json"
    assert modes.variant_output("all_reduce", "per-param", "overlap") == "results_all_reduce_per_param.json"
    assert baseline_multi_card.parse_args([]).output == "results_baseline_ddp.json"
    assert baseline_multi_card.parse_args(["--comm-hook", "bf16"]).output == "results_baseline_ddp_bf16.json"


# --------------------------------------------------------------------------- errors
REPORT = "import sys, common; common.report_error(sys.argv[1])"


def test_report_error_prints_once_per_torchrun_job(tmp_path):
    """Two processes of one job (same TORCHELASTIC_RUN_ID, MASTER_PORT, WORLD_SIZE=2), at once: one line in
    total; a third one afterwards: nothing. The marker lives in the temp folder (TMPDIR)."""
    script = tmp_path / "report.py"
    script.write_text(REPORT)
    env = {"TORCHELASTIC_RUN_ID": uuid.uuid4().hex, "MASTER_PORT": "29512", "WORLD_SIZE": "2", "TMPDIR": tmp_path}
    pair = [Forked(script, text, cwd=tmp_path, env=env) for text in ("first", "second")]
    outputs = [p.wait(timeout=120) for p in pair]
    assert all(p.returncode == 0 for p in outputs), outputs
    lines = [line for p in outputs for line in (p.stdout + p.stderr).splitlines()]
    assert len(lines) == 1 and lines[0] in ("error: first", "error: second"), outputs
    assert len(list(tmp_path.glob("kit-error-*"))) == 1
    late = Forked(script, "third", cwd=tmp_path, env=env).wait(timeout=120)
    assert late.returncode == 0 and (late.stdout, late.stderr) == ("", ""), late


def test_report_error_marker_is_per_job_attempt_and_only_for_groups(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", uuid.uuid4().hex)
    monkeypatch.setenv("MASTER_PORT", "29513")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    common.report_error("a")
    common.report_error("b")  # the same job: already reported
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    common.report_error("c")  # torchrun restarted the job: a new attempt reports again
    monkeypatch.setenv("MASTER_PORT", "29514")
    common.report_error("d")  # another job
    monkeypatch.setenv("WORLD_SIZE", "1")
    common.report_error("e")  # a group of one: no marker needed
    common.report_error("f")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setenv("WORLD_SIZE", "2")
    common.report_error("g")  # not under torchrun
    assert capsys.readouterr().err.splitlines() == [f"error: {x}" for x in "acdefg"]


def test_is_peer_failure_by_type():
    assert common.is_peer_failure(dist.DistBackendError("NCCL communicator was aborted"))
    assert common.is_peer_failure(dist.DistStoreError("store timeout"))
    assert not common.is_peer_failure(RuntimeError("operation timed out"))  # raised by other code
    assert not common.is_peer_failure(ValueError("[gloo/transport/tcp/pair.cc:1] looks like gloo"))
    assert not common.is_peer_failure(RuntimeError("Expected more than 1 value per channel when training"))
    try:  # a peer failure that another error was raised from still counts
        try:
            raise dist.DistNetworkError("connection reset")
        except dist.DistNetworkError as e:
            raise RuntimeError("while syncing") from e
    except RuntimeError as e:
        assert common.is_peer_failure(e)


# --------------------------------------------------------------------------- setup
def _gloo_peer_errors(rank):
    """Real errors of gloo's transport, as (type, message, is_peer_failure) on rank 0: two receives from a rank 1
    that sends nothing, in a group with a 1 s timeout (the first times out, then gloo closes the pair under
    the second), then a collective after rank 1 has left (its connection closed)."""
    errors = []
    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=1))
    if rank == 0:
        for work in [dist.irecv(torch.zeros(3), src=1, group=group, tag=tag) for tag in (0, 1)]:
            try:
                work.wait()
            except RuntimeError as e:
                errors.append(e)
    dist.barrier()
    if rank == 0:  # rank 1 leaves now (returns, closes its connections)
        try:
            dist.all_reduce(torch.ones(4))
        except RuntimeError as e:
            errors.append(e)
    return [(type(e).__name__, str(e), common.is_peer_failure(e)) for e in errors]


def _setup_and_sum(rank, world_size):
    ctx = common.setup_distributed(_args(backend="auto", timeout=1.0))
    try:
        t = torch.ones(1, device=ctx.device)
        measure.all_reduce(t)
        out = dict(rank=ctx.rank, world=ctx.world_size, backend=ctx.backend, device=str(ctx.device),
                   is_main=ctx.is_main, total=t.item())
        if world_size == 2 and ctx.backend == "gloo":
            out["peer_errors"] = _gloo_peer_errors(rank)
        return out
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
    if world_size == 2 and expected[0] == "gloo":
        # Real errors of gloo's transport ("[.../gloo/transport/tcp/unbound_buffer.cc:NN] Timed out waiting",
        # "Application timeout caused pair closure", "[.../gloo/transport/tcp/pair.cc:NNN] Connection closed by
        # peer"): peer failures, each reported as one line instead of a traceback.
        timed_out, closed, gone = out[0]["peer_errors"]
        assert "gloo/transport/" in timed_out[1].split("]")[0] and "Timed out" in timed_out[1], timed_out
        assert closed[1].startswith("Application timeout caused pair closure"), closed
        assert "gloo/transport/" in gone[1].split("]")[0], gone
        for kind, message, is_peer in (timed_out, closed, gone):
            assert kind == "RuntimeError" and is_peer, message
        assert out[1]["peer_errors"] == []


def test_setup_without_torchrun_env_is_a_group_of_one(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(var, "")  # recorded, so that the MASTER_* that setup exports are removed afterwards
        monkeypatch.delenv(var)  # (else every later subprocess of this session would inherit one fixed port)
    ctx = common.setup_distributed(_args())
    try:
        assert (ctx.rank, ctx.world_size, ctx.is_main) == (0, 1, True)
        assert os.environ["MASTER_ADDR"] == "127.0.0.1" and int(os.environ["MASTER_PORT"]) > 0
    finally:
        common.cleanup_distributed()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without GPUs")
def test_nccl_without_gpus_is_a_user_error():
    with pytest.raises(common.UserError, match="GPU"):
        common.setup_distributed(_args(backend="nccl"))


# --------------------------------------------------------------------------- model and schedule
def test_model_head_resized_and_identical_across_seeds():
    a, source = common.build_model(_args(arch="resnet18"), _ctx(), 7)
    b, _ = common.build_model(_args(arch="resnet18"), _ctx(), 7)
    assert a.fc.out_features == 7 and source == "random init"
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_channels_last_model():
    model, _ = common.build_model(_args(arch="resnet18", channels_last=True), _ctx(), 3)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.conv1.weight.is_contiguous()


def test_weights_file_is_loaded_and_a_wrong_one_rejected(tmp_path):
    from torchvision import models
    torch.manual_seed(123)
    reference = models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    model, source = common.build_model(_args(arch="resnet18", weights=str(tmp_path / "w.pth")), _ctx(), 1000)
    assert source.endswith("w.pth")
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(common.UserError, match="not a resnet18 state dict"):
        common.build_model(_args(arch="resnet18", weights=str(tmp_path / "bad.pth")), _ctx(), 10)
    with pytest.raises(common.UserError, match="does not exist"):
        common.build_model(_args(arch="resnet18", weights=str(tmp_path / "none.pth")), _ctx(), 10)


def _lr_args(*argv):
    return common.parse(common.make_parser("test", lambda a: "results.json"), list(argv))


def test_lr_default_is_constant():
    args = _lr_args("--lr", "0.2", "--epochs", "5")
    assert [common.lr_at(args, p) for p in (0, 0.01, 1, 2.5, 4.99)] == [0.2] * 5
    assert common.lr_at(_lr_args(), 0) == 0.01


def test_lr_linear_warmup_from_decay_times_lr():
    args = _lr_args("--lr", "0.1", "--lr-warmup-epochs", "2", "--lr-warmup-decay", "0.01", "--epochs", "4")
    assert common.lr_at(args, 0) == pytest.approx(0.001)
    assert common.lr_at(args, 0.5) == pytest.approx(0.1 * (0.01 + 0.99 * 0.25))
    assert common.lr_at(args, 1) == pytest.approx(0.1 * (0.01 + 0.99 * 0.5))
    assert common.lr_at(args, 1.999) < 0.1
    assert common.lr_at(args, 2) == common.lr_at(args, 3.5) == 0.1  # then constant
    steps = [common.lr_at(args, i / 100) for i in range(201)]
    assert all(b > a for a, b in zip(steps, steps[1:200]))  # rises at every step, not once per epoch
    fractional = _lr_args("--lr", "0.1", "--lr-warmup-epochs", "0.5")
    assert common.lr_at(fractional, 0.25) == pytest.approx(0.1 * (0.01 + 0.99 * 0.5))


def test_lr_step_decays_count_epochs_after_the_warmup():
    args = _lr_args("--lr", "0.1", "--lr-scheduler", "step", "--lr-step-size", "3", "--lr-gamma", "0.5",
                    "--epochs", "12")
    assert [common.lr_at(args, p) for p in (0, 2.99, 3, 5.99, 6, 9.5)] == pytest.approx(
        [0.1, 0.1, 0.05, 0.05, 0.025, 0.0125])
    warm = _lr_args("--lr", "0.1", "--lr-scheduler", "step", "--lr-step-size", "3", "--lr-gamma", "0.5",
                    "--lr-warmup-epochs", "2", "--epochs", "12")
    assert common.lr_at(warm, 4.99) == pytest.approx(0.1)  # 2.99 epochs after the warm-up
    assert common.lr_at(warm, 5) == pytest.approx(0.05)


def test_lr_cosine_ends_at_lr_min():
    args = _lr_args("--lr", "0.1", "--lr-scheduler", "cosine", "--lr-min", "0.001", "--epochs", "10",
                    "--lr-warmup-epochs", "2")
    assert common.lr_at(args, 2) == pytest.approx(0.1)
    assert common.lr_at(args, 6) == pytest.approx((0.1 + 0.001) / 2)  # halfway through the decay
    assert common.lr_at(args, 10) == pytest.approx(0.001)
    last_step = common.lr_at(args, 10 - 1 / 50)  # the last of 50 steps in epoch 10: just above --lr-min
    assert 0.001 < last_step < 0.0011
    decay = [common.lr_at(args, 2 + i / 10) for i in range(81)]
    assert all(b < a for a, b in zip(decay, decay[1:]))


def _torchvision_lrs(args):
    """The lr at the start of each epoch as torchvision's classification reference sets it up (train.py):
    LinearLR warm-up then StepLR / CosineAnnealingLR(T_max=epochs - warmup), joined by SequentialLR."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    if args.lr_scheduler == "step":
        main = torch.optim.lr_scheduler.StepLR(opt, step_size=args.lr_step_size, gamma=args.lr_gamma)
    else:
        main = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs - int(args.lr_warmup_epochs),
                                                          eta_min=args.lr_min)
    if args.lr_warmup_epochs:
        warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=args.lr_warmup_decay,
                                                 total_iters=int(args.lr_warmup_epochs))
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, main], milestones=[int(args.lr_warmup_epochs)])
    else:
        sched = main
    lrs = []
    for _ in range(args.epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("argv", [
    ["--lr-scheduler", "step", "--lr-step-size", "3", "--lr-gamma", "0.1", "--epochs", "10"],
    ["--lr-scheduler", "step", "--lr-step-size", "2", "--lr-gamma", "0.5", "--epochs", "10",
     "--lr-warmup-epochs", "3", "--lr-warmup-decay", "0.1"],
    ["--lr-scheduler", "cosine", "--epochs", "8", "--lr-min", "0.001"],
    ["--lr-scheduler", "cosine", "--epochs", "9", "--lr-min", "0.0", "--lr-warmup-epochs", "2"],
], ids=["step", "step-warmup", "cosine", "cosine-warmup"])
def test_lr_at_epoch_starts_equals_torchvision_schedulers(argv):
    args = _lr_args("--lr", "0.1", *argv)
    ours = [common.lr_at(args, epoch) for epoch in range(args.epochs)]
    assert ours == pytest.approx(_torchvision_lrs(args), rel=1e-9, abs=1e-12)


def test_set_lr():
    opt = common.make_optimizer(_args(), [torch.nn.Parameter(torch.zeros(2))])
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["weight_decay"] == 1e-4
    common.set_lr(opt, 0.5)
    assert opt.param_groups[0]["lr"] == 0.5


# --------------------------------------------------------------------------- flat buffers
def _sizes(buckets):
    return [[t.numel() for t in b] for b in buckets]


def test_split_buckets_consecutive_capped_and_split_by_dtype():
    ts = [torch.zeros(n) for n in (10, 300, 7, 7, 100)] + [torch.zeros(3, dtype=torch.float64)]
    # In the order given, at most 480 bytes each (exactly 480 fits), a larger tensor alone, never empty.
    assert _sizes(common.split_buckets(ts, 480)) == [[10], [300], [7, 7, 100], [3]]
    assert _sizes(common.split_buckets(ts[::-1], 480)) == [[3], [100, 7, 7], [300], [10]]
    assert [t for b in common.split_buckets(ts[::-1], 480) for t in b] == ts[::-1]
    assert _sizes(common.split_buckets(ts, 480, same_dtype=False)) == [[10], [300], [7, 7, 100, 3]]
    assert len(common.split_buckets(ts, 25 * 2 ** 20)) == 2  # float64 and float32 never share a bucket
    assert len(common.split_buckets(ts, 25 * 2 ** 20, same_dtype=False)) == 1
    assert _sizes(common.split_buckets(ts[:2], 1)) == [[10], [300]]
    assert common.split_buckets([], 480) == []
    assert [(f.flat.dtype, f.flat.numel()) for f in common.flat_by_dtype(ts)] == [
        (torch.float32, 424), (torch.float64, 3)]


def test_flat_buffer_views_keep_strides_and_round_trip():
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(4, 3, 5, 2, generator=g).to(memory_format=torch.channels_last)
    matrix = torch.randn(6, 5, generator=g).t()  # transposed: column-major strides
    vector = torch.randn(7, generator=g)
    tensors = [conv, matrix, vector]
    buffer = common.FlatBuffer(tensors)
    assert buffer.flat.numel() == sum(t.numel() for t in tensors) and buffer.flat.is_contiguous()
    offset = 0
    for t, view in zip(tensors, buffer.views):
        assert view.shape == t.shape and view.stride() == t.stride() and view.storage_offset() == offset
        assert view.untyped_storage().data_ptr() == buffer.flat.untyped_storage().data_ptr()
        offset += t.numel()
    assert conv.stride() != torch.empty(conv.shape).stride()  # the channels-last case is really tested
    flat = buffer.pack()
    assert flat is buffer.flat
    # Memory order is kept: the flat segment of each tensor is its storage, not a reordering.
    memory_order = [conv.permute(0, 2, 3, 1).reshape(-1), matrix.t().reshape(-1), vector]
    assert torch.equal(flat, torch.cat(memory_order))
    assert all(torch.equal(v, t) for v, t in zip(buffer.views, tensors))
    originals = [t.clone() for t in tensors]
    buffer.flat.mul_(2)
    buffer.unpack()
    assert all(torch.equal(t, 2 * o) for t, o in zip(tensors, originals))
    assert conv.is_contiguous(memory_format=torch.channels_last)  # unpack writes in place
    others = [torch.zeros_like(t) for t in tensors]
    buffer.unpack(others)
    assert all(torch.equal(x, t) for x, t in zip(others, tensors))
    buffer.pack([torch.ones_like(t) for t in tensors])
    assert torch.equal(buffer.flat, torch.ones(buffer.flat.numel()))


def test_flat_buffer_in_another_dtype():
    counter, stats = torch.tensor(5), torch.arange(3.0)
    buffer = common.FlatBuffer([counter, stats], torch.float32)
    assert buffer.flat.dtype == torch.float32 and torch.equal(buffer.pack(), torch.tensor([5.0, 0, 1, 2]))
    buffer.flat.div_(2)
    buffer.unpack()
    assert counter.dtype == torch.int64 and counter.item() == 2 and torch.equal(stats, torch.tensor([0, 0.5, 1]))


def test_output_folder_checked_before_training(tmp_path):
    with pytest.raises(common.UserError, match="does not exist"):
        common.check_output_path(tmp_path / "missing" / "r.json")
    common.check_output_path(tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []


def test_run_main_turns_errors_into_one_line(monkeypatch, capsys):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)

    def user():
        raise common.UserError("Traceback (most recent call last):\n  ...\ncommon.UserError: bad thing (fix it)")

    def peer():
        raise dist.DistBackendError("Connection reset by peer\nmore")

    def bug():
        raise RuntimeError("operation timed out")

    for fn, code in ((user, 2), (peer, 1)):
        with pytest.raises(SystemExit) as exit_info:
            common.run_main(fn)
        assert exit_info.value.code == code
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: bad thing (fix it)"
    assert err[1].startswith("error: communication with another process failed") and "Connection reset" in err[1]
    assert len(err) == 2
    with pytest.raises(RuntimeError, match="timed out"):  # a bug keeps its traceback
        common.run_main(bug)
