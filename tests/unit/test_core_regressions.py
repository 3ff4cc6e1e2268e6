"""Regressions found while testing sharded runs (each failed before its fix in hf_am/_core.py, _beta.py)."""

import socket

import pytest
import torch
import torch.distributed as dist

import hf_am


@pytest.fixture(scope="module")
def world1():
    """A one-rank gloo group: enough to drive the process_group code paths in this process."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_zero3_empty_groups_do_not_look_flattened(world1):
    """ZeRO-3 leaves every group but the stepped one with params=[]; scope='tensor' must still step."""
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(3))
    opt = hf_am.AMSGD(hf_am.param_groups_per_tensor([a, b]), lr=0.1, scope="tensor", process_group=world1)
    a.grad = torch.ones(4)
    saved = opt.param_groups[1]["params"]
    opt.param_groups[1]["params"] = []  # what DeepSpeed's stage-3 _optimizer_step does
    opt.step()
    opt.param_groups[1]["params"] = saved
    assert torch.allclose(a, torch.full((4,), 0.9)) and torch.equal(b, torch.ones(3))


def test_nan_sums_give_nan_beta():
    n = torch.tensor([float("nan")])
    assert torch.isnan(hf_am.adaptive_beta(n, n, n, 0.1, 0.0, 0.9)).all()


def test_split_check_counts_only_tensors_of_its_group(world1):
    """model scope with one process_group tensor and one whole tensor is not 'split'."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    w = torch.nn.Parameter(distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)]))  # whole: mesh of size 1
    b = torch.nn.Parameter(torch.ones(3))  # reduced over process_group
    opt = hf_am.AMSGD([w, b], lr=0.1, scope="model", process_group=world1)
    w.grad = distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)])
    b.grad = torch.ones(3)
    opt.step()
    assert torch.allclose(b, torch.full((3,), 0.9))


def test_rank_without_any_gradient_still_steps(world1):
    """A sharded rank whose parameters all lack gradients still takes part in the step's collective
    (the others need its zeros); recording the statistics must then be a no-op, not an error."""
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(3))
    opt = hf_am.AMAdamW([a, b], lr=0.1, scope="tensor", process_group=world1)
    opt.step()  # no .grad anywhere
    assert torch.equal(a, torch.ones(4)) and torch.equal(b, torch.ones(3))
    assert not any(opt.state.values())
