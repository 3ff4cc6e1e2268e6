"""The gate in front of every path: each tensor a step will touch is checked before anything changes.

The compiled kernels (:mod:`hf_am.kernels`) walk raw memory with one element
count per parameter, so a state tensor of another dtype or size (``model.double()``
after a few steps, ``load_state_dict`` from a model of other shapes) would be read
or written out of bounds.  :func:`check_step_tensors` runs for every path, before
phase 1, so any mismatch is a ``RuntimeError`` naming the parameter (group and
index), the tensor and what was expected, and a refused step changes nothing.

Cost: a handful of attribute reads per tensor, no device access (no host sync
on GPUs); measured in ``benchmarks/optimizer_overhead.py``.
"""

from __future__ import annotations

import operator

import torch

from .sharding import local_view


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype}, on {t.device}"


def _mismatch(optimizer, plan, i: int, name: str, found: str, expected: str, hint: str) -> RuntimeError:
    return RuntimeError(
        f"{type(optimizer).__name__}.step(): param group {plan.group_index}, parameter {plan.indices[i]} "
        f"({_describe(plan.local_params[i])}): {name} has {found}, expected {expected}. {hint} "
        "Nothing was changed by this step."
    )


_STATE_HINT = (
    "The parameter changed after its state was created (model.to(dtype/device), a replaced .data) or the state was "
    "loaded from another model: rebuild the optimizer, or load a state_dict of a model with these shapes."
)


def check_plan_tensors(optimizer, plan) -> None:
    """Raise when a gradient or state tensor of the group ``plan`` (a :class:`hf_am.planning.GroupPlan`)
    does not fit its parameter; :func:`hf_am.planning.plan_step` calls it before choosing a path."""
    for i, (p, lp, lg) in enumerate(zip(plan.params, plan.local_params, plan.local_grads)):
        _check_one(optimizer, plan, i, lp, lg, optimizer.state.get(p))


def _overlaps(t: torch.Tensor) -> bool:
    """Elements sharing memory (an ``expand``-ed view): an in-place update cannot write them."""
    if any(stride == 0 and size > 1 for stride, size in zip(t.stride(), t.shape)):
        return True
    has_overlap = getattr(torch, "_debug_has_internal_overlap", None)  # 0 no, 1 yes, 2 too hard to tell
    return has_overlap is not None and has_overlap(t) == 1


def _check_one(optimizer, plan, i: int, lp: torch.Tensor, lg: torch.Tensor, state) -> None:
    shape, dtype, device = lp.shape, lp.dtype, lp.device  # read once: each read builds a Python object
    if not lp.is_contiguous() and _overlaps(lp):
        raise _mismatch(
            optimizer, plan, i, "the parameter", f"strides {lp.stride()} (elements share memory)", "a tensor whose elements "
            "each have their own memory", "An expanded view cannot be updated in place: pass a materialised tensor (.clone()).",
        )  # fmt: skip
    if lg.shape != shape or lg.dtype != dtype or lg.device != device:
        raise _mismatch(
            optimizer, plan, i, "its gradient", _describe(lg), _describe(lp),
            "A gradient must have its parameter's shape, dtype and device.",
        )  # fmt: skip
    if not state:
        return
    # The one-element state (step counts, coefficients) only ever meets torch ops, never the compiled
    # kernels, so once checked it needs checking again only when an entry is another object (a loaded
    # or assigned state) or the parameter moved: ~6 checks per tensor and step, most of the gate's time.
    # A scalar changed in place through .data/set_ (which neither torch nor hf_am does to optimizer state)
    # is not checked again: torch's ops handle it as any tensor, and nothing compiled reads it.
    scalars = tuple(map(state.get, optimizer.required_scalar_state))
    checked = optimizer._checked_scalars
    seen = checked.get(id(state))  # holds the tensors: an id in it cannot be reused by another object
    if seen is not None and seen[0] == device and all(map(operator.is_, seen[1], scalars)):
        _check_state_tensors(optimizer, plan, i, lp, state, shape, dtype, device)
        return
    for name in optimizer.required_scalar_state:
        t = state.get(name)
        if not isinstance(t, torch.Tensor) or t.numel() != 1 or not t.is_floating_point() or t.device != device:
            if name not in state:
                missing = [k for k in optimizer.required_scalar_state if k not in state]
                raise _mismatch(optimizer, plan, i, "its state", f"no {missing}", f"the keys {list(optimizer.required_scalar_state)}", _STATE_HINT)
            found = f"device {t.device}" if isinstance(t, torch.Tensor) and t.numel() == 1 and t.is_floating_point() else repr(t)[:80]
            raise _mismatch(optimizer, plan, i, f"state {name!r}", found, f"a one-element floating tensor on {device}", _STATE_HINT)
    if len(checked) > _CHECKED_LIMIT:
        checked.clear()
    checked[id(state)] = (device, scalars)
    _check_state_tensors(optimizer, plan, i, lp, state, shape, dtype, device)


_CHECKED_LIMIT = 1 << 20  # state dicts remembered by _check_one (bounded for parameters that come and go)


def _check_state_tensors(optimizer, plan, i: int, lp: torch.Tensor, state, shape, dtype, device) -> None:
    """The per-element state (what the kernels walk) fits its parameter (``shape, dtype, device``): every step."""
    for name in optimizer.state_tensor_names:
        if name not in state:
            continue
        t = state[name]
        if not isinstance(t, torch.Tensor):
            raise _mismatch(optimizer, plan, i, f"state {name!r}", type(t).__name__, f"a tensor ({_describe(lp)})", _STATE_HINT)
        lt = local_view(t)
        if lt.shape != shape or lt.dtype != dtype or lt.device != device:
            raise _mismatch(optimizer, plan, i, f"state {name!r}", _describe(lt), _describe(lp), _STATE_HINT)
