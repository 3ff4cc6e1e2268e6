"""The gate in front of every path: each tensor a step will touch is checked before anything changes.

The compiled kernels (:mod:`hf_am.kernels`) walk raw memory with one element
count per parameter, so a state tensor of another dtype or size (``model.double()``
after a few steps, ``load_state_dict`` from a model of other shapes) would be read
or written out of bounds, and so would a tensor whose storage was freed or shrunk under it
(``untyped_storage().resize_(0)``, as FSDP does to unsharded parameters; torch's own ops crash on
one).  :func:`check_step_tensors` runs for every path, before
phase 1, so any mismatch is a ``RuntimeError`` naming the parameter (group and
index), the tensor and what was expected, and a refused step changes nothing.

Two layers, one meaning: :func:`_walk` is the definition, one tensor at a time, and
writes the messages; :func:`_all_fit` accepts the common case in bulk (lists of
shapes, dtypes and devices compared whole, in C-level ``map`` loops) and hands
anything it does not accept to the walk.  It accepts nothing the walk would refuse
(tests/unit/test_gate_bulk.py holds the two to each other), and it is what most
steps run: at the tiny recipe's 21 tensors 80-145 us a step against the walk's ~650 us
(measured in isolation on the 2-core CPU, whose timings vary up to 2x between minutes).

Cost: attribute reads, no device access (no host sync on GPUs); measured in
``benchmarks/step_profile.py`` and ``benchmarks/gate_cost.py``.
"""

from __future__ import annotations

import operator
from itertools import repeat
from typing import List, Optional, Tuple

import torch

from .kernels.interface import byte_sizes, inside_storage, remembered_check
from .sharding import DTensor, local_view


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


def check_plan_tensors(optimizer, plan) -> bool:
    """Raise when a gradient or state tensor of the group ``plan`` (a :class:`hf_am.planning.GroupPlan`)
    does not fit its parameter; :func:`hf_am.planning.plan_step` calls it before choosing a path.

    Returns True where the bulk check accepted the plan: then every gradient and per-element state tensor
    is contiguous, as its parameter is, with the parameter's shape, dtype and device, and
    ``plan.state_tensors`` holds the per-element state lists it read (what the path choice and the phases
    would otherwise gather again).  False: the walk accepted it (other layouts, first sightings)."""
    if _all_fit(optimizer, plan):
        return True
    _walk(optimizer, plan)
    return False


def _walk(optimizer, plan) -> None:
    """The gate's definition, tensor by tensor: raises naming the first tensor that does not fit."""
    for i, (p, lp, lg) in enumerate(zip(plan.params, plan.local_params, plan.local_grads)):
        _check_one(optimizer, plan, i, lp, lg, optimizer.state.get(p))
    _remember_scalars(optimizer, plan)


_SHAPE, _DTYPE, _DEVICE = operator.attrgetter("shape"), operator.attrgetter("dtype"), operator.attrgetter("device")


def _all_fit(optimizer, plan) -> bool:
    """True when :func:`_walk` would find nothing to refuse, decided in bulk; False sends the plan to it.

    Accepts only: gradients of their parameters' shapes, dtypes and devices; parameters, gradients and
    per-element state contiguous and inside their storage (every step, since a storage can be freed
    under an unchanged tensor object: the kernels walk these); either no parameter with state yet, or
    every one with all its per-element state fitting and the same one-element state objects as when
    the walk last accepted this group.  The one-element state (step counts, coefficients) needs its
    kind, size and dtype checked again only when an entry is another object (a loaded or assigned state)
    or a parameter moved to another device: it meets torch ops, and the C functions that read or write
    it (:mod:`hf_am.kernels.cpu`) check dtype, size and storage themselves.  Its extent is checked every
    step, since a storage freed under an unchanged object (``untyped_storage().resize_(0)``) would crash
    torch's copy into it; in full only where an object, its address or its dtype changed
    (:func:`hf_am.kernels.interface.remembered_check`: ~25 us a step for the tiny recipe's 126, against
    ~45 us for the full check).
    """
    lps, lgs = plan.local_params, plan.local_grads
    shapes, dtypes, devices = list(map(_SHAPE, lps)), list(map(_DTYPE, lps)), list(map(_DEVICE, lps))
    if list(map(_SHAPE, lgs)) != shapes or list(map(_DTYPE, lgs)) != dtypes or list(map(_DEVICE, lgs)) != devices:
        return False
    own_bytes, itemsizes = byte_sizes(lps)  # the same for grads and state
    if not inside_storage(lps, own_bytes, itemsizes) or not inside_storage(lgs, own_bytes, itemsizes):
        return False
    states = list(map(optimizer.state.get, plan.params))
    if not any(states):
        plan.state_tensors = []
        return True
    if not all(states) or not all(map(isinstance, states, repeat(dict))):
        return False  # some parameters have state and some not (or a state is no dict): walk
    scalars = _scalar_objects(optimizer, states)
    seen = optimizer._gate_accepted.get(id(states[0]))  # by state, not group: DeepSpeed swaps the groups
    if seen is None or seen[0] is not states[0] or seen[1] != devices or len(seen[2]) != len(scalars):
        return False
    if not all(map(operator.is_, seen[2], scalars)):
        return False
    if not remembered_check("inside storage", scalars, _scalars_inside_storage, dtypes_matter=False):
        return False  # one freed or shrunk under its object, or one without a storage of its own (a DTensor): the walk checks it
    gathered = []
    for name in optimizer.state_tensor_names:
        tensors = _local_state(states, name)
        if tensors is None:
            return False
        if tensors and (list(map(_SHAPE, tensors)) != shapes or list(map(_DTYPE, tensors)) != dtypes
                        or list(map(_DEVICE, tensors)) != devices or not inside_storage(tensors, own_bytes, itemsizes)):  # fmt: skip
            return False
        if tensors:
            gathered.append(tensors)
    plan.state_tensors = gathered
    return True


def _scalars_inside_storage(tensors, addresses, dtypes) -> bool:
    """:func:`_all_fit`'s storage check of the one-element state (through ``remembered_check``: in full where
    an object, its address or its dtype changed since the last full check)."""
    return 0 not in addresses and inside_storage(tensors)


_STORAGE_HINT = ("Reading it would read freed memory (its storage was resized, e.g. untyped_storage().resize_(0)): "
                 "restore its storage or give it a materialised tensor.")
_LAYOUT_HINT = "The optimizer's paths read dense strided memory: give it a dense tensor (.to_dense())."


def _storage_problem(t: torch.Tensor) -> Optional[Tuple[str, str]]:
    """``(what was found, hint)`` for a tensor not strided or not all inside its storage, or ``None``.
    A tensor subclass without a storage of its own (a wrapper subclass) is left to its own ops."""
    if t.layout != torch.strided:
        return f"layout {t.layout}", _LAYOUT_HINT
    if t.numel() == 0:
        return None
    try:
        held = t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    last = t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    needed = (last + 1) * t.element_size()
    if needed > held:
        return f"a storage of {held} bytes where its elements need {needed}", _STORAGE_HINT
    return None


def _local_state(states, name) -> Optional[List[torch.Tensor]]:
    """The local views of state ``name`` of every parameter, ``[]`` when none has it yet, ``None`` when
    some have it and some not, or an entry is no tensor (the walk says which)."""
    tensors = list(map(dict.get, states, repeat(name)))
    present = sum(map(operator.is_not, tensors, repeat(None)))
    if present < len(tensors):
        return [] if present == 0 else None
    if not all(map(isinstance, tensors, repeat(torch.Tensor))):
        return None
    if DTensor is not None and any(map(isinstance, tensors, repeat(DTensor))):
        tensors = list(map(local_view, tensors))
    return tensors


def _remember_scalars(optimizer, plan) -> None:
    """After the walk accepted ``plan``: the one-element state objects :func:`_all_fit` may take as checked."""
    states = list(map(optimizer.state.get, plan.params))
    if not all(states):
        return
    accepted = optimizer._gate_accepted
    if len(accepted) > _ACCEPTED_LIMIT:
        accepted.clear()
    # Keyed by the first parameter's state and holding it and the tensors, so no id in it can be
    # reused by another object while it is remembered.
    accepted[id(states[0])] = (states[0], list(map(_DEVICE, plan.local_params)), _scalar_objects(optimizer, states))


def _scalar_objects(optimizer, states) -> tuple:
    """Every one-element state entry of ``states``, in order: what the walk accepted, compared by identity."""
    names = optimizer.required_scalar_state
    return tuple(state.get(name) for state in states for name in names)


_ACCEPTED_LIMIT = 1 << 16  # param groups' entries remembered (bounded for groups that come and go)


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
    for name, t in (("the parameter", lp), ("its gradient", lg)):
        _check_storage(optimizer, plan, i, name, t)
    if not state:
        return
    for name in optimizer.required_scalar_state:
        t = state.get(name)
        if not isinstance(t, torch.Tensor) or t.numel() != 1 or not t.is_floating_point() or t.device != device:
            if name not in state:
                missing = [k for k in optimizer.required_scalar_state if k not in state]
                raise _mismatch(optimizer, plan, i, "its state", f"no {missing}", f"the keys {list(optimizer.required_scalar_state)}", _STATE_HINT)
            found = f"device {t.device}" if isinstance(t, torch.Tensor) and t.numel() == 1 and t.is_floating_point() else repr(t)[:80]
            raise _mismatch(optimizer, plan, i, f"state {name!r}", found, f"a one-element floating tensor on {device}", _STATE_HINT)
        _check_storage(optimizer, plan, i, f"state {name!r}", local_view(t))
    _check_state_tensors(optimizer, plan, i, lp, state, shape, dtype, device)


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
        _check_storage(optimizer, plan, i, f"state {name!r}", lt)


def _check_storage(optimizer, plan, i: int, name: str, t: torch.Tensor) -> None:
    problem = _storage_problem(t)
    if problem is not None:
        raise _mismatch(optimizer, plan, i, name, problem[0], "a strided tensor whose elements all lie inside its storage", problem[1])
