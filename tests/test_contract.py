"""all_reduce_train.py's syncs in a training loop of the user's own (docs/own_loop.md), each mode against
torch.nn.parallel.DistributedDataParallel itself, in real gloo groups of 2 and 4 processes: rank 0's parameters
(frozen ones too) and buffers at construction; DDP's parameters, gradients and BatchNorm buffers after 5 steps
however the loop zeroes gradients (optimizer.zero_grad() with either set_to_none, model.zero_grad(), not at all);
a tied weight; no_sync() accumulation of 4 micro-batches; an unused parameter refused by name, or treated as
DDP(find_unused_parameters=True) treats it; a model changed after construction refused. One group launch per size
runs every check."""
import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import common
from dist_helpers import run_in_group
from sync import allreduce, pipelined_allreduce

MODES = ("per-param", "bucketed", "overlap", "ring", "hierarchical", "pipelined")
ZEROING = ("optimizer", "optimizer-in-place", "model", "none")
BUCKET_MB = 300 / 2 ** 20  # 300 bytes: several buckets on Net
PER_NODE = 2  # hierarchical: 2 processes are one node, 4 are 2 nodes x 2 (two levels)
STEPS = 5
TOL = 1e-6  # relative to the largest magnitude


class Net(nn.Module):
    """Linear + BatchNorm, a frozen layer, a weight tied between two layers; `spare`: a layer no forward uses,
    `branch`: one that only even ranks' forwards use (find_unused_parameters). Seeded per rank, running statistics
    too, so that construction has something to make identical."""

    def __init__(self, seed, unused=False):
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.bn, self.hidden = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 8)
        self.frozen, self.tied, self.head = nn.Linear(8, 8).requires_grad_(False), nn.Linear(8, 8), nn.Linear(8, 3)
        self.tied.weight = self.hidden.weight
        self.bn.running_mean.normal_()
        self.bn.running_var.uniform_(0.5, 2)
        self.unused, self.branch_everywhere = unused, False
        if unused:
            self.spare, self.branch = nn.Linear(8, 3), nn.Linear(8, 8)

    def forward(self, x):
        h = torch.relu(self.hidden(torch.relu(self.bn(self.embed(x)))))
        if self.unused and (self.branch_everywhere or torch.distributed.get_rank() % 2 == 0):
            h = torch.relu(self.branch(h))
        return self.head(torch.relu(self.tied(torch.relu(self.frozen(h)))))


def _batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)


def _rel_err(ours, ref):
    ours, ref = list(ours), list(ref)
    assert len(ours) == len(ref)
    scale = max(max(t.abs().max().item() for t in ref), 1e-12)
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(ours, ref)) / scale




def make_sync(model, mode, optimizer, **contract):
    if mode == "pipelined":
        return pipelined_allreduce.PipelinedSync(model, optimizer, None, BUCKET_MB, **contract)
    if mode == "hierarchical":
        return allreduce.HierarchicalSync(model, BUCKET_MB, local_size=PER_NODE, **contract)
    return allreduce.GradSync(model, mode, BUCKET_MB, **contract)


def _zero(how, model, optimizer):
    if how == "optimizer":
        optimizer.zero_grad()
    elif how == "optimizer-in-place":
        optimizer.zero_grad(set_to_none=False)
    elif how == "model":
        model.zero_grad()


def _views_intact(sync):
    return all(p.grad is sync.views[id(p)] for p in sync.params)


def _pair(rank, mode, unused=False, find_unused=False):
    """Our sync and DDP on copies of one per-rank model, each with SGD (momentum and weight decay)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    base = Net(100 + rank, unused)
    ours, ddp = copy.deepcopy(base), DDP(copy.deepcopy(base), find_unused_parameters=find_unused)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2) for m in (ours, ddp)]
    return base, ours, ddp, opts, make_sync(ours, mode, opts[0], find_unused_parameters=find_unused)


def _compare(ours, ddp, sync):
    if sync.pipelined:
        sync.flush()
    grads = [(a.grad, b.grad) for a, b in zip(ours.parameters(), ddp.module.parameters()) if a.grad is not None
             and b.grad is not None]
    return {"param": _rel_err(ours.parameters(), ddp.module.parameters()),
            "buffer": _rel_err(ours.buffers(), ddp.module.buffers()),
            "grad": _rel_err(*zip(*grads)),
            "none_alike": [p.grad is None for p in ours.parameters()] == [p.grad is None for p in ddp.parameters()]}


def _loop(rank, mode, zeroing):
    """A user's loop, the same on ours and on DDP, with a learning-rate schedule; pipelined updates inside the next
    forward (at the learning rate of its backward's step), so no step()."""
    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step()` before")  # pipelined: no step()
    base, ours, ddp, opts, sync = _pair(rank, mode)
    schedules = [torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step)) for opt in opts]
    out = {"start": {"ours": _rel_err(ours.state_dict().values(), ddp.module.state_dict().values()),
                     "rank_differs": _rel_err(base.state_dict().values(), ddp.module.state_dict().values())}}
    for step in range(STEPS):
        x, y = _batch(step, rank)
        for model, opt, schedule in zip((ours, ddp), opts, schedules):
            _zero(zeroing, model, opt)
            nn.functional.cross_entropy(model(x), y).backward()
            if not (model is ours and sync.pipelined):
                opt.step()
            schedule.step()
    out["views"] = sync.pipelined or not sync.buckets or _views_intact(sync)
    out.update(_compare(ours, ddp, sync))
    return out


def _no_sync(rank, mode):
    """2 optimizer steps of 4 micro-batches each, the first 3 inside no_sync(), as DDP accumulates them."""
    _, ours, ddp, opts, sync = _pair(rank, mode)
    for step in range(2):
        for model, opt, quiet in ((ours, opts[0], sync.no_sync), (ddp, opts[1], ddp.no_sync)):
            opt.zero_grad()
            for micro in range(4):
                x, y = _batch(10 * step + micro, rank)
                with quiet() if micro < 3 else contextlib.nullcontext():
                    nn.functional.cross_entropy(model(x), y).backward()
            if not (model is ours and sync.pipelined):
                opt.step()
    return _compare(ours, ddp, sync)


def _unused(rank, mode):
    """Without find_unused_parameters: the error names the unused parameters (the same on every rank, so that the
    group goes on with the same collectives everywhere). With it: DDP's, for a layer no rank uses (grads stay None,
    weight decay skips it) and one only even ranks use."""
    x, y = _batch(0, rank)
    _, ours, _, opts, sync = _pair(rank, mode, unused=True)
    ours.branch_everywhere = True
    try:
        nn.functional.cross_entropy(ours(x), y).backward()
        refused = None
    except common.UserError as e:
        refused = str(e)
    torch.distributed.barrier()
    _, ours, ddp, opts, sync = _pair(rank, mode, unused=True, find_unused=True)
    for step in range(STEPS):
        x, y = _batch(step, rank)
        for model, opt in ((ours, opts[0]), (ddp, opts[1])):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if not (model is ours and sync.pipelined):
                opt.step()
    return {"refused": refused, **_compare(ours, ddp, sync)}


def _changed(rank, mode):
    """A layer replaced, or a parameter added, after the sync was built: the next forward refuses, by name."""
    out = {}
    for change in ("replaced", "added"):
        model = Net(0)
        sync = make_sync(model, mode, torch.optim.SGD(model.parameters(), lr=0.1))
        if change == "replaced":
            model.head = nn.Linear(8, 3)
        else:
            model.extra = nn.Parameter(torch.zeros(3))
        try:
            model(_batch(0, rank)[0])
            out[change] = None
        except common.UserError as e:
            out[change] = str(e)
        if sync.pipelined:
            sync.flush()
    return out


def _contract(rank, world_size):
    out = {}
    for mode in MODES:
        for zeroing in ZEROING:
            out["loop", mode, zeroing] = _loop(rank, mode, zeroing)
        out["no_sync", mode] = _no_sync(rank, mode)
        out["unused", mode] = _unused(rank, mode)
        out["changed", mode] = _changed(rank, mode)
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=["2 processes", "4 processes"])
def group_run(request):
    return run_in_group(_contract, request.param)


def _close(res):
    assert res["param"] < TOL and res["buffer"] < TOL and res["grad"] < TOL, res
    assert res["none_alike"], res


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("zeroing", ZEROING)
def test_own_loop_matches_ddp_however_gradients_are_zeroed(group_run, mode, zeroing):
    """5 steps of a user's loop: parameters (a tied weight among them), gradients and buffers equal DDP's."""
    for rank, out in enumerate(group_run):
        res = out["loop", mode, zeroing]
        _close(res)
        assert res["views"], "after backward every .grad is its bucket view again (DDP's gradient_as_bucket_view)"


@pytest.mark.parametrize("mode", MODES)
def test_construction_makes_every_parameter_and_buffer_rank_0s(group_run, mode):
    """Frozen weights and BatchNorm statistics seeded differently per rank are rank 0's after construction, as
    DDP makes them."""
    for rank, out in enumerate(group_run):
        start = out["loop", mode, "optimizer"]["start"]
        assert start["ours"] == 0.0, (rank, start)
        assert rank == 0 or start["rank_differs"] > 0.1, "the ranks' models must differ for this test to mean much"


@pytest.mark.parametrize("mode", MODES)
def test_no_sync_accumulation_matches_ddp(group_run, mode):
    for out in group_run:
        _close(out["no_sync", mode])


@pytest.mark.parametrize("mode", MODES)
def test_unused_parameters_refused_by_name_or_treated_as_ddp(group_run, mode):
    for rank, out in enumerate(group_run):
        res = out["unused", mode]
        assert res["refused"] is not None and "spare.weight" in res["refused"], res
        assert "find_unused_parameters=True" in res["refused"], res
        _close(res)


@pytest.mark.parametrize("mode", MODES)
def test_a_model_changed_after_construction_is_refused(group_run, mode):
    for out in group_run:
        res = out["changed", mode]
        assert res["replaced"] is not None and "head.weight" in res["replaced"], res
        assert res["added"] is not None and "extra" in res["added"], res
