"""The per-step re-check of options written into ``param_groups`` (hf_am.hyperparameters.revalidate_changed_options).

A scheduler's new float ``lr`` is checked on its own instead of through the whole rule table; these tests
hold that shortcut to the full validation: a valid float lr skips the table, and every value the table
would refuse (or that is not a plain valid float, or comes with another change) still goes through it and
raises before the step changes anything.
"""

import math

import numpy as np
import pytest
import torch

from hf_am import AMAdamW, AMSGD
from hf_am.hyperparameters import _lr_ok, _only_a_valid_float_lr_changed

OPTIMIZERS = {"am_adamw": (AMAdamW, 1e-3), "am_sgd": (AMSGD, 0.1)}


def _stepped(name):
    cls, lr = OPTIMIZERS[name]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = cls([{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}], lr=lr)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt, params


def _count_full_checks(opt, monkeypatch):
    calls = []
    inner = type(opt).validate_group_options

    def counted(group):
        calls.append(group["lr"])
        return inner(group)

    monkeypatch.setattr(opt, "validate_group_options", counted)
    return calls


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_scheduler_float_lr_skips_the_rule_table_and_is_used(name, monkeypatch):
    opt, params = _stepped(name)
    calls = _count_full_checks(opt, monkeypatch)
    for lr in [1e-4, 0.0, 2.5e-3]:
        for group in opt.param_groups:
            group["lr"] = lr
        before = [p.detach().clone() for p in params]
        opt.step()
        moved = not all(torch.equal(b, p) for b, p in zip(before, params))
        assert moved == (lr != 0.0)  # the new lr is the one the step used
    assert calls == []


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("bad", [-1e-3, math.nan, math.inf, -math.inf, "0.1", None, True])
def test_an_invalid_lr_written_after_construction_still_raises_before_the_step(name, bad):
    opt, params = _stepped(name)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.param_groups[1]["lr"] = bad
    before = [p.detach().clone() for p in params]
    with pytest.raises((ValueError, TypeError), match="learning rate"):
        opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, params))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_an_lr_change_with_another_change_takes_the_full_check(name, monkeypatch):
    opt, params = _stepped(name)
    calls = _count_full_checks(opt, monkeypatch)
    opt.param_groups[0]["lr"] = 1e-4
    opt.param_groups[0]["weight_decay"] = "0.1"
    with pytest.raises(ValueError, match="Invalid weight_decay: '0.1'"):
        opt.step()
    assert calls == [1e-4]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("value", [np.float64(1e-4), 1, torch.tensor(1e-4)])
def test_an_lr_that_is_not_a_python_float_takes_the_full_check(name, value, monkeypatch):
    opt, params = _stepped(name)
    calls = _count_full_checks(opt, monkeypatch)
    opt.param_groups[0]["lr"] = value
    opt.step()
    assert len(calls) == 1


@pytest.mark.parametrize(
    "before, key, expected",
    [
        (None, (("lr", 0.1),), False),
        ((("lr", 0.1),), (("lr", 0.2),), True),
        ((("lr", 0.1), ("eps", 1e-8)), (("lr", 0.2), ("eps", 1e-8)), True),
        ((("lr", 0.1), ("eps", 1e-8)), (("lr", 0.2), ("eps", 1e-7)), False),
        ((("lr", 0.1), ("eps", 1e-8)), (("lr", 0.2),), False),
        ((("lr", 0.1), ("eps", 1e-8)), (("lr", 0.2), ("lam", 1e-8)), False),
        ((("lr", 0.1),), (("lr", -0.2),), False),
        ((("lr", 0.1),), (("lr", math.nan),), False),
        ((("lr", 0.1),), (("lr", math.inf),), False),
        ((("lr", 0.1),), (("lr", 1),), False),
        ((("lr", 0.1),), (("lr", np.float64(0.2)),), False),
        ((("lr", 0.1), ("betas", (0.9, 0.999))), (("lr", 0.2), ("betas", (0.9, 0.999))), True),
        ((("lr", 0.1), ("betas", (0.9, 0.999))), (("lr", 0.2), ("betas", (0.9, 0.99))), False),
    ],
)
def test_the_shortcut_accepts_exactly_a_lone_valid_float_lr(before, key, expected):
    assert _only_a_valid_float_lr_changed(before, key) is expected


@pytest.mark.parametrize("lr", [0.0, -0.0, 5e-324, 1e-300, 1e-3, 1.0, 1e308, 1.7976931348623157e308, -5e-324, -1e-3,
                                math.nan, -math.nan, math.inf, -math.inf])
def test_the_shortcut_and_the_lr_rule_agree_on_every_float(lr):
    """The shortcut tests a float lr inline, for speed; this holds it to the LR rule's own predicate."""
    assert _only_a_valid_float_lr_changed((("lr", 0.5),), (("lr", lr),)) is _lr_ok(lr, None)
