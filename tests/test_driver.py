"""The driver's rooms: results.py (the results JSON, rewritten atomically, a finished run never replaced),
checkpoint.py (a checkpoint of another run refused before anything is touched; a torn or corrupt latest falls
back to the one before), and the lines the user reads (start-up, overhead, epoch)."""
import json

import pytest
import torch

import checkpoint
import measure
import driver
import results
from data import DataInfo
from dist_helpers import cli_args as _args, cpu_ctx as _ctx, run_in_group

INFO = DataInfo("sample", "/x", 10, 100, 20, 32, 5, False)
RECORD = {"epoch": 1, "train_loss": 1.0, "train_accuracy": 10.0, "train_time": 2.0, "train_throughput": 50.0,
          "avg_batch_time": 0.1, "avg_data_time": 0.01, "all_losses": [1.0, 1.5], "val_loss": 1.2,
          "val_accuracy": 12.0, "phase_times": {"data": 0.01, "compute": 0.09}}


def _method(trainers=2, **settings):
    return driver.Method(kind="ps", description="test", settings=settings or {"comm": "p2p"}, model=None, step=None,
                         state={}, trainers=list(range(trainers)), fields={"extra": "x"})


# --------------------------------------------------------------------------- results
def test_results_are_rewritten_atomically_with_status(tmp_path):
    path = tmp_path / "r.json"
    out = results.Results(path, _method(), _ctx(0, 2), _args(), INFO, writer=True)
    data = json.loads(path.read_text())
    assert data["status"] == "incomplete" and data["kind"] == "ps" and data["method"] == "Parameter Server (PS)"
    assert data["trainers"] == 2 and data["world_size"] == 2 and data["extra"] == "x" and data["comm"] == "p2p"
    assert data["steps_per_epoch"] == 5 and data["dataset"]["steps"] == 5 and data["image_size"] == 32
    assert data["dataset"]["dropped_last_image"] is False and data["network"] is None
    out.add_epoch(dict(RECORD))
    data = json.loads(path.read_text())
    assert data["status"] == "incomplete" and len(data["epochs"]) == 1 and data["all_losses"] == [1.0, 1.5]
    assert data["summary"]["best_val_accuracy"] == 12.0 and data["summary"]["avg_train_throughput"] == 50.0
    out.add_epoch({**RECORD, "epoch": 2, "val_accuracy": 20.0, "train_throughput": 70.0})
    out.update(note="late")
    out.finish()
    data = json.loads(path.read_text())
    assert data["status"] == "complete" and data["summary"]["avg_train_throughput"] == 60.0
    assert data["summary"]["best_val_accuracy"] == 20.0 and data["note"] == "late"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind
    assert "accuracy_note" not in data
    results.Results(tmp_path / "s.json", _method(1), _ctx(), _args(synthetic=True), INFO, writer=True)
    assert "meaningless" in json.loads((tmp_path / "s.json").read_text())["accuracy_note"]
    results.Results(tmp_path / "t.json", _method(1), _ctx(), _args(), INFO, writer=False)
    assert not (tmp_path / "t.json").exists()  # only the writer writes


def test_summary_averages_every_avg_field_and_scaling_efficiency(tmp_path):
    out = results.Results(tmp_path / "r.json", _method(), _ctx(0, 2), _args(batch_size=4), INFO, writer=True)
    extra = [{"avg_comm_time": 0.2, "avg_server_update_time": 1.0, "avg_anything_new": 3.0, "avg_text": "n/a",
              "link": None, "scaling_efficiency": 0.5},
             {"avg_comm_time": 0.4, "avg_server_update_time": 2.0, "avg_anything_new": 5.0, "avg_sometimes": 1.0,
              "avg_text": "n/a", "link": None, "scaling_efficiency": 1.0}]
    for i, fields in enumerate(extra):
        out.add_epoch({**RECORD, "epoch": i + 1, "train_throughput": 40.0 * (i + 1), **fields})
    summary = json.loads((tmp_path / "r.json").read_text())["summary"]
    assert summary["scaling_efficiency"] == pytest.approx(0.75)
    assert summary["avg_comm_time"] == pytest.approx(0.3) and summary["avg_server_update_time"] == 1.5
    assert summary["avg_anything_new"] == 4.0 and summary["avg_batch_time"] == pytest.approx(0.1)
    assert summary["avg_data_time"] == pytest.approx(0.01) and summary["avg_train_throughput"] == 60.0
    # Not a number in every epoch: no mean.
    assert "avg_sometimes" not in summary and "avg_text" not in summary and "link" not in summary
    assert summary == results.summarize(json.loads((tmp_path / "r.json").read_text())["epochs"])


def test_a_results_file_already_there_is_moved_aside_never_replaced(tmp_path):
    path = tmp_path / "r.json"
    first = results.Results(path, _method(), _ctx(0, 2), _args(), INFO, writer=True)
    first.add_epoch(dict(RECORD))
    first.finish()
    ended = json.loads(path.read_text())["end_time"]
    second = results.Results(path, _method(), _ctx(0, 2), _args(), INFO, writer=True)
    kept, what = second.moved
    assert kept == tmp_path / "previous" / f"r_{ended.replace(' ', '_').replace(':', '-')}.json"
    assert what == f"a complete run (ended {ended})" and json.loads(kept.read_text())["status"] == "complete"
    assert json.loads(path.read_text())["epochs"] == []  # the new run's file
    results.Results(path, _method(), _ctx(0, 2), _args(), INFO, writer=True)  # an incomplete one: kept too
    assert len(list((tmp_path / "previous").iterdir())) == 2
    assert results.Results(tmp_path / "new.json", _method(), _ctx(0, 2), _args(), INFO, writer=True).moved is None


# --------------------------------------------------------------------------- checkpoints
class Counter:
    """A stand-in for an optimizer: state_dict / load_state_dict."""

    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": torch.tensor(self.n)}

    def load_state_dict(self, state):
        self.n = int(state["n"])


def _checkpoints(rank, world_size, root, plans):
    """For each plan in its own folder: saves after steps 5, 10 and 20 (rank r's counter = step + r), damages what
    the plan says, then loads."""
    out = {}
    for plan in plans:
        folder = root / plan
        folder.mkdir(exist_ok=True)
        ctx = _ctx(rank, world_size)
        args = _args(resume=True, output=str(folder / "r.json"))
        sign = checkpoint.signature(args, ctx, INFO, _method(world_size, comm="p2p"))
        ckpts = checkpoint.Checkpoints(args, ctx, sign, owner=rank, writer=0, load=True, save=True)
        for step in (5, 10, 20):
            counter = Counter()
            counter.n = step + rank
            ckpts.save(step, {"epoch": step // 10, "state": {"c": counter.state_dict()},
                              "results": {"at": step} if rank == 0 else None})
        torch.distributed.barrier()
        if rank == 0 and plan == "truncate":
            part = folder / "r.ckpt" / "step00000020" / "rank1.pt"
            part.write_bytes(part.read_bytes()[:100])
        if rank == 0 and plan == "corrupt-both":
            for step in ("step00000010", "step00000020"):
                part = folder / "r.ckpt" / step / "rank1.pt"
                part.write_bytes(part.read_bytes()[:-1] + b"x")
        torch.distributed.barrier()
        try:
            part = ckpts.load()
        except Exception as e:  # noqa: BLE001 - the test looks at what was raised
            out[plan] = type(e).__name__, str(e)
            continue
        restored = Counter()
        restored.load_state_dict(part["state"]["c"])
        out[plan] = part["epoch"], restored.n, part["results"]
    return out


def test_a_torn_or_corrupt_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    plans = ("none", "truncate", "corrupt-both")
    ranks = run_in_group(_checkpoints, 2, tmp_path, plans)
    assert [r["none"] for r in ranks] == [(2, 20, {"at": 20}), (2, 21, None)]
    # rank 1's latest part is torn: every rank goes back to step 10 together
    assert [r["truncate"] for r in ranks] == [(1, 10, {"at": 10}), (1, 11, None)]
    assert all(r["corrupt-both"][0] == "UserError" and "no readable checkpoint" in r["corrupt-both"][1]
               for r in ranks)
    for plan in plans:  # the latest and the one before it are kept, nothing older (step 5 is gone)
        assert sorted(p.name for p in (tmp_path / plan / "r.ckpt").glob("step*")) == ["step00000010",
                                                                                      "step00000020"]


def test_a_checkpoint_of_another_run_is_refused_naming_both_values(tmp_path):
    folder = tmp_path / "r.ckpt"
    folder.mkdir()
    args = _args(resume=True, output=str(tmp_path / "r.json"), arch="resnet34")
    (folder / "run.json").write_text(json.dumps(checkpoint.signature(_args(arch="resnet18"), _ctx(), INFO,
                                                                      _method(1))))
    ckpts = checkpoint.Checkpoints(args, _ctx(), checkpoint.signature(args, _ctx(), INFO, _method(1)), 0, 0, True, True)
    with pytest.raises(Exception, match="--arch resnet18 there, resnet34 here"):
        ckpts.check()
    other = checkpoint.Checkpoints(args, _ctx(), checkpoint.signature(args, _ctx(), INFO, _method(1, comm="x")), 0, 0,
                                   True, True)
    with pytest.raises(Exception, match="--comm p2p there, x here"):
        other.check()


# --------------------------------------------------------------------------- what the user reads
def test_epoch_line_and_data_bound_warning(capsys):
    record = {**RECORD, "avg_batch_time": 0.1, "avg_data_time": 0.05}
    line = results.epoch_line(record)
    assert line.startswith("epoch 1: train loss 1.0000 acc 10.00%") and "(data 10.0 compute 90.0 ms)" in line
    assert line.endswith("val loss 1.2000 acc 12.00%")
    results.warn_if_data_bound(_ctx(), record)
    results.warn_if_data_bound(_ctx(), {**record, "avg_data_time": 0.01})
    results.warn_if_data_bound(_ctx(1, 2), record)  # not the reporting rank
    assert capsys.readouterr().out.count("warning: data loading is 50% of each step") == 1


def test_overhead_line_says_what_one_process_measures_and_when_the_hidden_share_is_noise():
    block = {"overhead": 0.02, "overhead_share": 0.1, "step_time": 0.2, "pairs": 3, "overhead_min": -0.001,
             "overhead_max": 0.03}
    one = measure.overhead_line(block, trainers=1)
    assert "one trainer: no byte crosses a link" in one and "within noise of zero" in one
    assert "one trainer" not in measure.overhead_line(block, trainers=2)
    noisy = {**block, "blocking_overhead": 0.025, "blocking_overhead_min": 0.01, "blocking_overhead_max": 0.04,
             "hidden_share": 0.2}
    assert "no share is hidden beyond the noise" in measure.overhead_line(noisy, 2)
    clear = {**noisy, "blocking_overhead": 0.2, "blocking_overhead_min": 0.19, "blocking_overhead_max": 0.21,
             "hidden_share": 0.9}
    assert "90% is hidden behind backward" in measure.overhead_line(clear, 2)


@pytest.mark.parametrize("change,named", [(dict(arch="resnet34"), "--arch resnet18 there, resnet34 here"),
                                          (dict(batch_size=8), "--batch-size 4 there, 8 here"),
                                          (dict(seed=1), "--seed 0 there, 1 here")])
def test_every_setting_of_the_signature_is_checked(tmp_path, change, named):
    base = dict(resume=True, output=str(tmp_path / "r.json"), arch="resnet18", batch_size=4, seed=0)
    folder = tmp_path / "r.ckpt"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps(checkpoint.signature(_args(**base), _ctx(), INFO, _method(1))))
    args = _args(**{**base, **change})
    with pytest.raises(Exception, match=named):
        checkpoint.Checkpoints(args, _ctx(), checkpoint.signature(args, _ctx(), INFO, _method(1)), 0, 0, True,
                               True).check()


def test_the_data_and_the_processes_are_part_of_the_signature():
    import dataclasses
    sign = checkpoint.signature(_args(), _ctx(0, 2), INFO, _method(2))
    other = checkpoint.signature(_args(), _ctx(0, 4), dataclasses.replace(INFO, num_classes=1000, root="/imagenet"),
                                 _method(4))
    assert {k for k in sign if sign[k] != other[k]} == {"processes", "dataset", "classes"}


def test_a_fresh_run_does_not_write_over_an_earlier_runs_checkpoints(tmp_path):
    (tmp_path / "r.ckpt").mkdir()
    (tmp_path / "r.ckpt" / "latest").write_text("step00000010")
    args = _args(output=str(tmp_path / "r.json"), checkpoint_every=5)
    with pytest.raises(Exception, match="holds the checkpoints of an earlier run .add --resume"):
        checkpoint.Checkpoints(args, _ctx(), {}, 0, 0, load=False, save=True).check()
