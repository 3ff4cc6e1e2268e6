"""AM-AdamW runs the C kernels once per phase for param groups that differ only in weight decay
(hf_am/am_adamw.py, ``_phase_runs``): the same bits as one call per group, and never a call over
tensors the kernels would walk with the wrong element type."""

from __future__ import annotations

import pytest
import torch

import hf_am
from helpers import per_group_am_adamw
from hf_am.kernels import cpu_build
from hf_am.planning import plan_step

pytestmark = pytest.mark.skipif(cpu_build.library() is None, reason="needs the C kernels (a C compiler)")


PerGroupAMAdamW = per_group_am_adamw()  # one kernel call per param group and phase


def _params(dtypes=(torch.float32,) * 5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(17, 9), (9,), (70000,), (5, 3), (4,)]  # one tensor of two 64K chunks
    return [torch.randn(s, generator=gen, dtype=d).requires_grad_() for s, d in zip(shapes, dtypes)]


def _train(cls, make_groups, dtypes=(torch.float32,) * 5, steps=5, **kw):
    params = _params(dtypes)
    opt = cls(make_groups(params), lr=1e-2, **kw)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        if step == 2:
            params[1].grad = None  # a member without a gradient this step
        opt.step()
    state = [(k, v.clone()) for p in params for k, v in sorted(opt.state[p].items()) if torch.is_tensor(v)]
    return opt, [p.detach().clone() for p in params], state


def _runs(opt):
    plans, _ = plan_step(opt)
    return [sorted(m.group_index for m in members) for _, members in opt._phase_runs(plans)]


TRAINER = lambda ps: [dict(params=[p for p in ps if p.dim() >= 2], weight_decay=0.1),  # noqa: E731
                      dict(params=[p for p in ps if p.dim() < 2], weight_decay=0.0)]
APART = lambda ps: [dict(params=ps[:2], weight_decay=0.1), dict(params=ps[2:3], lr=3e-3),  # noqa: E731
                    dict(params=ps[3:], weight_decay=0.0)]


@pytest.mark.parametrize("scope", ["tensor", "group", "model"])
@pytest.mark.parametrize("make_groups,expected", [(TRAINER, [[0, 1]]), (APART, [[0, 2], [1]])], ids=["trainer", "apart"])
def test_merged_calls_give_the_bits_of_one_call_per_group(scope, make_groups, expected):
    merged, params, state = _train(hf_am.AMAdamW, make_groups, scope=scope)
    assert _runs(merged) == expected  # the groups really share a call
    per_group, params_ref, state_ref = _train(PerGroupAMAdamW, make_groups, scope=scope)
    assert len(_runs(per_group)) == len(per_group.param_groups)
    for a, b in zip(params + [v for _, v in state], params_ref + [v for _, v in state_ref]):
        assert torch.equal(a, b)
    assert merged.beta_stats() == per_group.beta_stats()


def test_groups_of_other_dtypes_restart_flags_or_rates_are_not_merged():
    dtypes = (torch.float32, torch.float32, torch.float64, torch.float64, torch.float32)
    groups = lambda ps: [dict(params=ps[:2]), dict(params=ps[2:4]), dict(params=ps[4:], weight_decay=0.0)]  # noqa: E731
    opt, params, state = _train(hf_am.AMAdamW, groups, dtypes=dtypes)
    assert _runs(opt) == [[0, 2], [1]]  # float64 tensors never share a float32 call
    _, params_ref, _ = _train(PerGroupAMAdamW, groups, dtypes=dtypes)
    assert all(torch.equal(a, b) for a, b in zip(params, params_ref))
    restart = lambda ps: [dict(params=ps[:2]), dict(params=ps[2:], restart_threshold=0.5)]  # noqa: E731
    assert _runs(_train(hf_am.AMAdamW, restart, steps=1)[0]) == [[0], [1]]
    beta2 = lambda ps: [dict(params=ps[:2]), dict(params=ps[2:], betas=(0.9, 0.99))]  # noqa: E731
    assert _runs(_train(hf_am.AMAdamW, beta2, steps=1)[0]) == [[0], [1]]
