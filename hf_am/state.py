"""The optimizer state AM adds to AdamW's/SGD's: key names, dtypes, format version, loading.

Scalar state is kept per parameter (replicated over the parameters of a scope),
so every piece of state travels with its parameter when checkpoints are
resharded (docs/algorithm.md §8, §11).
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Dict

import torch

from .sharding import local_view

PROD = "am_prod"  # product of the applied coefficients (AM-AdamW bias correction, §6)
BETA = "am_beta"  # the scope's reported coefficient of the latest step (§9)
RESTARTS = "am_restarts"  # number of momentum restarts of the scope so far (§7)
PREV_LOSS = "am_prev_loss"  # loss of the previous step (loss_estimate="exact", §3)
# Param-group keys.
PREV_LR = "am_prev_lr"  # the previous step's learning rate (§3)
INIT_TENSORS = "am_init_tensors"  # tensors in the group when it was added (before a wrapper flattens it)
INIT_NUMEL = "am_init_numel"  # their elements
STATE_FORMAT_KEY = "am_state_format"  # written into every param group of state_dict()

#: Version of the layout of the AM state in ``state_dict()``.  Raise it whenever a
#: key or its meaning changes, and teach :func:`check_state_format` to convert or refuse.
STATE_FORMAT = 1


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums and scalar state accumulate in float32, or float64 for float64 parameters."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_low_precision(tensors) -> bool:
    """True when the tensors are not all of one float32/float64 dtype (the multi-tensor path's assumption)."""
    return any(t.dtype != accumulation_dtype(t.dtype) for t in tensors) or len({t.dtype for t in tensors}) > 1


def new_scalar_state(state: Dict[str, Any], local_p: torch.Tensor) -> None:
    """The step count and the per-scope scalars of a parameter seen for the first time."""
    acc = accumulation_dtype(local_p.dtype)
    state["step"] = torch.zeros((), dtype=torch.float32, device=local_p.device)
    state[BETA] = torch.zeros((), dtype=acc, device=local_p.device)
    state[RESTARTS] = torch.zeros((), dtype=acc, device=local_p.device)


def check_state_format(state_dict: Dict[str, Any], optimizer_name: str) -> None:
    """Refuse a checkpoint written by a newer hf_am whose AM state this version cannot read.

    A checkpoint without the key was written before formats were versioned
    (hf_am 0.1.0), whose layout is format 1.
    """
    for index, group in enumerate(state_dict.get("param_groups", [])):
        version = group.get(STATE_FORMAT_KEY, 1)
        if not isinstance(version, int) or version > STATE_FORMAT or version < 1:
            raise ValueError(
                f"{optimizer_name}.load_state_dict: param group {index} holds AM state format {version!r}, but this "
                f"hf_am reads formats 1..{STATE_FORMAT}. The checkpoint was written by a newer hf_am: upgrade hf_am "
                "to resume it"
            )


def mark_state_format(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    for group in state_dict["param_groups"]:
        group[STATE_FORMAT_KEY] = STATE_FORMAT
    return state_dict


def restore_scalar_state(optimizer: torch.optim.Optimizer, state_dict: Dict[str, Any]) -> None:
    """After ``torch.optim.Optimizer.load_state_dict``: give AM scalars back their accumulation dtype.

    torch casts every floating state tensor to the parameter's dtype; the
    products and coefficients must stay float32/64 so that a resumed bf16 run
    continues bit for bit.
    """
    saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
    saved_state = state_dict["state"]
    current = list(chain.from_iterable(g["params"] for g in optimizer.param_groups))
    for pid, p in zip(saved_ids, current):
        saved = saved_state.get(pid)
        if not saved:
            continue
        device = local_view(p).device
        for key, value in saved.items():
            if isinstance(value, torch.Tensor) and (key.startswith("am_") or key == "step"):
                optimizer.state[p][key] = value.detach().clone().to(device=device)
