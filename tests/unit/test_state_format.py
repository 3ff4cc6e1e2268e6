"""The AM state format version in state_dict() (docs/algorithm.md §11)."""

from __future__ import annotations

import pytest
import torch

from helpers import make_batches, make_model, train
from hf_am import AMAdamW, AMSGD
from hf_am.state import STATE_FORMAT, STATE_FORMAT_KEY


@pytest.mark.parametrize("cls", [AMAdamW, AMSGD])
def test_state_dict_names_its_format_and_round_trips(cls):
    model = make_model()
    opt = cls(model.parameters(), lr=1e-2)
    train(model, opt, make_batches(3))
    sd = opt.state_dict()
    assert all(g[STATE_FORMAT_KEY] == STATE_FORMAT for g in sd["param_groups"])
    other = cls(make_model().parameters(), lr=1e-2)
    other.load_state_dict(sd)
    assert other.beta == opt.beta


@pytest.mark.parametrize("cls", [AMAdamW, AMSGD])
def test_a_newer_format_is_refused_with_a_clear_message(cls):
    model = make_model()
    opt = cls(model.parameters(), lr=1e-2)
    train(model, opt, make_batches(2))
    sd = opt.state_dict()
    sd["param_groups"][0][STATE_FORMAT_KEY] = STATE_FORMAT + 1
    fresh = cls(make_model().parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=rf"format {STATE_FORMAT + 1}.*upgrade hf_am"):
        fresh.load_state_dict(sd)
    assert len(fresh.state) == 0  # nothing was loaded


def test_an_unversioned_checkpoint_reads_as_format_1():
    model = make_model()
    opt = AMAdamW(model.parameters(), lr=1e-2)
    train(model, opt, make_batches(2))
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g[STATE_FORMAT_KEY]
    fresh = AMAdamW(make_model().parameters(), lr=1e-2)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.betas_per_scope(), opt.betas_per_scope())
