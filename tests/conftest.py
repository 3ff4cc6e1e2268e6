"""Shared fixtures.  The helpers themselves live in ``tests/helpers.py`` (one copy each), so that
worker processes, which do not load this file, import the same code.

``tests/``, ``recipes/`` and the two ``workers/`` folders are on ``sys.path`` through pytest's
``pythonpath`` setting in ``pyproject.toml``; no test module edits ``sys.path``.
"""

from __future__ import annotations

import os

import pytest

import helpers

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub


@pytest.fixture
def free_port() -> int:
    """A free localhost port (helpers.free_port)."""
    return helpers.free_port()


@pytest.fixture
def make_model():
    """The tiny MLP factory (helpers.make_model): ``make_model(seed=0, dtype=..., out_features=3)``."""
    return helpers.make_model


@pytest.fixture
def deepspeed_config():
    """The DeepSpeed config builder (helpers.deepspeed_config)."""
    return helpers.deepspeed_config


@pytest.fixture
def max_param_diff():
    """Largest elementwise parameter difference (helpers.max_param_diff)."""
    return helpers.max_param_diff


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A saved tiny LLaMA (trainer_common.save_tiny_model), one per test module, for Trainer runs."""
    from trainer_common import save_tiny_model

    path = str(tmp_path_factory.mktemp("tiny_llama"))
    save_tiny_model(path)
    return path
