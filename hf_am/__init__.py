"""Adaptive Memory (AM) momentum for the Hugging Face training stack.

``import hf_am`` makes :class:`AMAdamW` and :class:`AMSGD` available and, when
``transformers`` is installed, registers them as Trainer optimizers
``--optim am_adamw`` / ``--optim am_sgd`` (set ``HF_AM_NO_TRAINER_PATCH=1`` to skip).
"""

import importlib.util as _importlib_util
import os as _os

from .am_adamw import AMAdamW
from .am_sgd import AMSGD
from .coefficient import adaptive_beta, effective_momentum
from .hyperparameters import Hyperparameters
from .optimizer import AMOptimizer, param_groups_per_tensor
from .planning import Path

__version__ = "0.1.0"
__all__ = [
    "AMAdamW",
    "attach",
    "AMSGD",
    "AMOptimizer",
    "Hyperparameters",
    "Path",
    "adaptive_beta",
    "effective_momentum",
    "param_groups_per_tensor",
]


def attach(obj, model=None):
    """Wire the AM optimizer inside a DeepSpeed engine / accelerate-prepared optimizer (and an FSDP1
    ``model``) to the group that shards its state: see :func:`hf_am.integrations.wrappers.attach`."""
    from .integrations.wrappers import attach as _attach

    return _attach(obj, model=model)


def _register_trainer_integration() -> None:
    if _os.environ.get("HF_AM_NO_TRAINER_PATCH", "0") not in ("", "0", "false", "False"):
        return
    if _importlib_util.find_spec("transformers") is None:
        return
    try:
        from .integrations import trainer as _trainer
    except ImportError:  # the integration module is optional at this layer
        return
    _trainer.register()


_register_trainer_integration()
