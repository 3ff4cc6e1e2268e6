"""The optimizer state AM adds to AdamW's/SGD's: key names, dtypes, format version, loading.

Scalar state is kept per parameter (replicated over the parameters of a scope),
so every piece of state travels with its parameter when checkpoints are
resharded (docs/algorithm.md §8, §11).
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Dict, List, Tuple

import torch

from .sharding import local_view

PROD = "am_prod"  # product of the applied coefficients (AM-AdamW bias correction, §6)
BETA = "am_beta"  # the scope's reported coefficient of the latest step (§9)
RESTARTS = "am_restarts"  # number of momentum restarts of the scope so far (§7)
FALLBACKS = "am_fallbacks"  # steps whose sums were not finite, so the coefficient fell back to beta_max (§2)
APPLIED = "am_applied"  # the coefficient the latest update multiplied the old momentum by (0 on a restart, §9)
PREV_LOSS = "am_prev_loss"  # loss of the previous step (loss_estimate="exact", §3)
# Param-group keys.
PREV_LR = "am_prev_lr"  # the previous step's learning rate (§3)
INIT_TENSORS = "am_init_tensors"  # tensors in the group when it was added (before a wrapper flattens it)
INIT_NUMEL = "am_init_numel"  # their elements
STATE_FORMAT_KEY = "am_state_format"  # written into every param group of state_dict()

#: Version of the layout of the AM state in ``state_dict()``.  Raise it whenever a
#: key or its meaning changes, and teach :func:`check_state_format` to convert or refuse.
#: 1: hf_am 0.1.0 (also checkpoints without the key);  2: adds ``am_fallbacks`` and ``am_applied``.
STATE_FORMAT = 2


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
    state[FALLBACKS] = torch.zeros((), dtype=acc, device=local_p.device)
    state[APPLIED] = torch.zeros((), dtype=acc, device=local_p.device)


def check_state_format(state_dict: Dict[str, Any], optimizer_name: str) -> None:
    """Refuse a checkpoint written by a newer hf_am whose AM state this version cannot read.

    A checkpoint without the key was written before formats were versioned
    (hf_am 0.1.0), whose layout is format 1; :func:`restore_scalar_state` upgrades
    format 1 by adding ``am_fallbacks = 0``.
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
    lam_of = {id(p): float(g["lam"]) for g in optimizer.param_groups for p in g["params"]}
    for pid, p in zip(saved_ids, current):
        saved = saved_state.get(pid)
        if not saved:
            continue
        device = local_view(p).device
        for key, value in saved.items():
            if isinstance(value, torch.Tensor) and (key.startswith("am_") or key == "step"):
                optimizer.state[p][key] = value.detach().clone().to(device=device)
        state = optimizer.state[p]
        if RESTARTS in state and FALLBACKS not in state:  # format 1
            state[FALLBACKS] = torch.zeros_like(state[RESTARTS])
        if BETA in state and APPLIED not in state:  # format 1: the applied coefficient of the reported one
            lam = lam_of.get(id(p), 0.0)
            state[APPLIED] = (state[BETA] + lam) / (1.0 + lam)


def _saved_params(state_dict: Dict[str, Any], optimizer) -> List[Tuple[int, int, Any, torch.Tensor]]:
    """``(group index, index in group, saved id, current parameter)`` in the order torch pairs them."""
    out = []
    for gi, (saved, current) in enumerate(zip(state_dict["param_groups"], optimizer.param_groups)):
        for i, (pid, p) in enumerate(zip(saved["params"], current["params"])):
            out.append((gi, i, pid, p))
    return out


def check_state_fits(optimizer, state_dict: Dict[str, Any]) -> None:
    """``ValueError`` at load time for state that does not fit the parameters it would be given to.

    torch's own check covers the number of groups and parameters; this adds the
    shapes of the per-element state (a state dict of a model with other shapes
    would otherwise be read out of bounds by the kernels at the next step).
    """
    name = type(optimizer).__name__
    saved_groups, groups = state_dict.get("param_groups", []), optimizer.param_groups
    if len(saved_groups) != len(groups) or any(len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, groups)):
        return  # torch's load_state_dict raises its own clear ValueError for this
    for gi, i, pid, p in _saved_params(state_dict, optimizer):
        saved = state_dict["state"].get(pid)
        if not saved:
            continue
        tensors = [k for k in optimizer.state_tensor_names if k in saved]
        if tensors and len(tensors) != len(optimizer.state_tensor_names):
            missing = sorted(set(optimizer.state_tensor_names) - set(tensors))
            raise ValueError(f"{name}.load_state_dict: param group {gi}, parameter {i}: the state lacks {missing}")
        for key in tensors:
            value = saved[key]
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(p.shape):
                found = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(
                    f"{name}.load_state_dict: param group {gi}, parameter {i} has shape {tuple(p.shape)}, but its "
                    f"state {key!r} has {found}: the state dict belongs to a model with other shapes (or its "
                    "parameters are in another order). Nothing was loaded"
                )


# Param-group options an AM group has and a torch.optim.AdamW group lacks; taken from the current groups.
_AM_GROUP_KEYS = ("lam", "beta_min", "restart_threshold", "foreach", "fused", "maximize", INIT_TENSORS, INIT_NUMEL)
# torch.optim.AdamW options without meaning in AM-AdamW (validated away before they are dropped).
_ADAMW_ONLY_KEYS = ("amsgrad", "capturable", "differentiable", "decoupled_weight_decay")


def adopt_foreign_state(optimizer, state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """A ``torch.optim.AdamW`` state dict made loadable by :class:`hf_am.AMAdamW` (other dicts unchanged).

    Recognised by param groups without ``lam``.  The moments and step counts are
    kept; each parameter's ``am_prod`` becomes ``beta1 ** step`` (AdamW's bias
    correction, so the next step continues it), ``am_beta`` becomes ``beta1`` (the
    coefficient AdamW used), restart and fallback counts start at 0; the AM
    options come from the optimizer's current param groups.
    """
    groups = state_dict.get("param_groups", [])
    if not groups or all("lam" in g for g in groups):
        return state_dict
    name = type(optimizer).__name__
    if optimizer.beta_max_key != "betas":
        raise ValueError(
            f"{name}.load_state_dict: the state dict has no AM settings (param groups without 'lam'): it was written "
            "by another optimizer. Only torch.optim.AdamW state can be adopted, by hf_am.AMAdamW"
        )
    if len(groups) != len(optimizer.param_groups):
        return state_dict  # torch raises its clear ValueError
    new_groups = []
    for gi, (saved, current) in enumerate(zip(groups, optimizer.param_groups)):
        if "betas" not in saved or "eps" not in saved:
            raise ValueError(f"{name}.load_state_dict: param group {gi} has neither AM nor AdamW settings ({sorted(saved)})")
        if saved.get("amsgrad"):
            raise ValueError(
                f"{name}.load_state_dict: param group {gi} comes from AdamW(amsgrad=True), whose running maximum of "
                "the second moment AM-AdamW does not have; resume with torch's AdamW, or start AM-AdamW afresh"
            )
        group = {k: v for k, v in saved.items() if k not in _ADAMW_ONLY_KEYS}
        group.update({k: current[k] for k in _AM_GROUP_KEYS if k in current})
        new_groups.append(group)
    new_state: Dict[Any, Any] = {}
    for gi, i, pid, p in _saved_params({"param_groups": groups, "state": state_dict["state"]}, optimizer):
        saved = state_dict["state"].get(pid)
        if not saved:
            continue
        if "exp_avg" not in saved or "exp_avg_sq" not in saved or "step" not in saved:
            raise ValueError(f"{name}.load_state_dict: param group {gi}, parameter {i}: AdamW state without exp_avg, exp_avg_sq and step")
        acc = accumulation_dtype(local_view(p).dtype)
        beta1 = float(groups[gi]["betas"][0])
        step = torch.as_tensor(saved["step"]).detach().to(torch.float32).reshape(())
        converted = {k: v for k, v in saved.items() if k in ("exp_avg", "exp_avg_sq")}
        converted["step"] = step.clone()
        converted[PROD] = torch.tensor(beta1, dtype=torch.float64).pow(step.double()).to(acc)
        converted[BETA] = torch.tensor(beta1, dtype=acc)
        converted[RESTARTS] = torch.zeros((), dtype=acc)
        converted[FALLBACKS] = torch.zeros((), dtype=acc)
        converted[APPLIED] = torch.tensor(beta1, dtype=acc)  # AdamW applied beta1
        new_state[pid] = converted
    return {**state_dict, "param_groups": new_groups, "state": new_state}


def check_saved_options(optimizer, state_dict: Dict[str, Any]) -> None:
    """The options of every saved param group must pass the constructor's rules (checked on a copy)."""
    name = type(optimizer).__name__
    for index, saved in enumerate(state_dict["param_groups"]):
        if not isinstance(saved, dict) or "params" not in saved:
            raise ValueError(f"{name}.load_state_dict: param group {index} is not a param group ({type(saved).__name__})")
        identity = [optimizer.beta_max_key, *(["eps"] if optimizer.beta_max_key == "betas" else [])]
        missing = [k for k in identity if k not in saved]
        if missing:
            raise ValueError(
                f"{name}.load_state_dict: param group {index} has no {missing}: the state dict was written by "
                "another optimizer. Nothing was loaded"
            )
        options = {**{k: v for k, v in optimizer.defaults.items() if k not in saved}, **saved}
        try:
            optimizer.validate_group_options(options)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{name}.load_state_dict: param group {index}: {exc}. Nothing was loaded") from None
