"""Distributed CAM-HD: DDP and FSDP2 equal one process (docs/algorithm.md §5.6), FSDP2 checkpoints, flattened groups.

The multi-process tests launch ``torchrun --nproc_per_node 2`` (gloo on CPU) on
``tests/dist_workers/train_worker.py`` twice: ``train`` (a DDP run, an FSDP2 run saving a rank-sharded DCP
checkpoint half-way) and ``resume`` (fresh processes load it and finish the run).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_camhd import CAMHDAdam, CAMHDSGD

from conftest import make_net, train

WORKERS = Path(__file__).parent / "dist_workers"
sys.path.insert(0, str(WORKERS))
import dist_common as C  # noqa: E402

LEVELS = ("global", "block", "layer", "unit", "parameter")


pytestmark = pytest.mark.usefixtures("one_thread")


def _torchrun(mode: str, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKERS / "train_worker.py"), mode, str(out)]
    # own session: on a timeout the whole group (torchrun and its workers) is killed, nothing is left behind
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:  # pragma: no cover
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"torchrun {mode} timed out:\n{stdout[-4000:]}\n{stderr[-8000:]}") from None
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {mode} failed:\n{stdout[-4000:]}\n{stderr[-8000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    _torchrun("train", out)
    _torchrun("resume", out)
    load = lambda name: torch.load(out / name, weights_only=True)  # noqa: E731
    refs = {}
    for base in ("adam",) + C.OTHER_BASES:
        model = C.make_model()
        opt = C.make_optimizer(model, base)
        C.train_steps(model, opt, 0, C.STEPS)
        refs[base] = C.snapshot(model, opt)
    return {"ref": refs, "train": [load(f"train_rank{r}.pt") for r in (0, 1)],
            "resume": [load(f"resume_rank{r}.pt") for r in (0, 1)]}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp", "fsdp_adamw", "fsdp_sgdn", "fsdp_normalized"])
def test_two_processes_equal_one_process(runs, kind):
    ref, got = runs["ref"][kind.split("_")[1] if "_" in kind else "adam"], runs["train"][0][kind]
    assert got["steps"] == ref["steps"] == C.STEPS
    assert not torch.allclose(ref["alpha_layer"], torch.full_like(ref["alpha_layer"], 1e-2))  # α really moved
    assert float((ref["gamma"] - 0.2).abs().max()) > 1e-4                                     # and γ too
    assert not torch.allclose(ref["alpha_unit"], ref["alpha_unit"][:1].expand_as(ref["alpha_unit"]))
    for k in ref:
        if k != "steps":
            assert _rel(got[k], ref[k]) <= 1e-6, (kind, k, _rel(got[k], ref[k]))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp_rank", "fsdp_rank"])
def test_every_rank_holds_the_same_alpha_and_gamma(runs, kind):
    r0, r1 = runs["train"][0][kind], runs["train"][1][kind]
    assert r0.keys() == r1.keys() and "camhd_gamma" in r0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert torch.equal(runs["train"][0]["fsdp"]["alpha_unit"], runs["train"][1]["fsdp"]["alpha_unit"])


@pytest.mark.slow
def test_fsdp2_one_all_reduce_per_step_and_unit_alpha_sharded_like_the_parameters(runs):
    calls = runs["train"][0]["all_reduce_calls_per_step"]
    assert calls == [0] + [1] * (len(calls) - 1)  # step 1 has no hyper-gradient (u = 0)
    placements = runs["train"][0]["unit_alpha_placements"]
    assert placements["inp.weight"] == "(Shard(dim=0),)"   # units along the sharded dim: sharded α
    assert placements["mid.weight"] == "(Replicate(),)"    # units along dim 1 (Conv1D-like): replicated α


@pytest.mark.slow
def test_fsdp2_dcp_checkpoint_resumes_identically_in_fresh_processes(runs):
    for rank in (0, 1):
        res = runs["resume"][rank]
        assert res["init_step_changed_nothing"]  # get_optimizer_state_dict's state-creating step
        assert res["loaded_steps"] == C.STEPS // 2
        assert res["dtypes"] == [str(C.DTYPE)]
    full, resumed = runs["train"][0]["fsdp"], runs["resume"][0]["fsdp"]
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    for k, v in runs["train"][0]["fsdp_rank"].items():
        assert torch.equal(v, runs["resume"][1]["fsdp_rank"][k]), k


# ------------------------------------------------------------------------------------------ in-process
@pytest.mark.parametrize("cls,kw", [(CAMHDAdam, dict(lr=1e-3)), (CAMHDSGD, dict(lr=0.05, momentum=0.9))])
def test_dcp_state_creating_step_changes_nothing(cls, kw):
    """get_optimizer_state_dict on a fresh optimizer calls step() with zero grads and lr=0 to create the state."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    kw = dict(kw, levels=LEVELS, hypergrad_lr=1e-4, hypergrad_rule="additive", gamma_lr=0.05, decay_rate=0.01)
    m_ref = make_net()
    train(m_ref, cls(m_ref, **kw), 5)
    m = make_net()
    opt = cls(m, **kw)
    before = [p.detach().clone() for p in m.parameters()]
    osd = get_optimizer_state_dict(m, opt)
    assert opt.num_steps == 0 and all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert all(p.grad is None for p in m.parameters()) and opt.param_groups[0]["lr"] == kw["lr"]
    keys = set(next(iter(osd["state"].values())))
    assert {"hypergrad_dir_scale", "camhd_alpha_unit", "camhd_alpha_parameter_offset"} <= keys
    assert "hypergrad_dir" not in keys  # both rebuild the previous direction from their own state
    train(m, opt, 5)  # the created state changes nothing: same run as without it
    for a, b in zip(m.parameters(), m_ref.parameters()):
        assert torch.equal(a, b)
    # and it round-trips through the DCP helpers
    m2 = make_net(seed=3)
    m2.load_state_dict(m.state_dict())
    opt2 = cls(m2, **kw)
    set_optimizer_state_dict(m2, opt2, get_optimizer_state_dict(m, opt))
    assert opt2.num_steps == 5 and torch.equal(opt2.alpha("unit"), opt.alpha("unit"))


def test_flattened_param_groups_raise_a_clear_error_at_the_first_step():
    """DeepSpeed ZeRO replaces each group's params by one flat partition per rank."""
    m = make_net()
    opt = CAMHDAdam(m, levels=("global", "block", "layer", "unit"))
    flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in m.parameters()])[:100].clone())
    flat.grad = torch.ones_like(flat)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match=r"flattened.*DeepSpeed ZeRO.*levels block, layer, unit of this tree"):
        opt.step()
    g = CAMHDAdam(make_net(), levels=("global",))
    g.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match="global level would be summed over one rank's partition only"):
        g.step()


def test_sharded_path_in_one_process_matches_the_plain_optimizer():
    """FSDP2 on a 1-rank mesh runs the sharded code path (DTensor state, the reduction vector) in-process."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hf_camhd.optim import sharding as D

    assert not D.is_dtensor(torch.zeros(2))
    lay = D.tensor_layout(torch.zeros(5, 3), unit_dim=0)
    assert (lay.group, lay.unit_lo, lay.unit_hi) == (None, 0, 5)
    assert not dist.is_initialized(), "an earlier test left a default process group initialized"
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        ref = C.make_model()
        opt_ref = C.make_optimizer(ref)
        C.train_steps(ref, opt_ref, 0, 6)
        model = C.make_model()
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        opt = C.make_optimizer(model)
        assert all(D.is_dtensor(p) for p in model.parameters())
        C.train_steps(model, opt, 0, 6)
        a, b = C.snapshot(model, opt), C.snapshot(ref, opt_ref)
        for k in b:
            assert _rel(a[k].double(), b[k].double()) <= 1e-12, k
        assert D.is_dtensor(opt.state[model.inp.weight]["camhd_alpha_unit"])
        with pytest.raises(NotImplementedError, match=r"\(foreach=False\) does not support sharded"):
            opt_ref = C.make_optimizer(model)
            opt_ref.foreach = False
            C.train_steps(model, opt_ref, 0, 1)
    finally:
        dist.destroy_process_group()
