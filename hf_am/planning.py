"""Planning a step: which tensors step, in which scope, on which path; built before anything is mutated.

:func:`plan_step` turns the param groups into one :class:`GroupPlan` per group
with gradients and the call's :class:`Layout` (which depends on the param groups
only, so every rank runs the same collectives, docs/algorithm.md §8).
:func:`choose_path` is the one place that picks an implementation.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from . import kernels as kernel_sets
from .gate import check_plan_tensors
from .hyperparameters import Hyperparameters
from .sharding import local_view, reduction_groups
from .state import INIT_TENSORS, is_low_precision


class Path(str, Enum):
    """The implementations of a step (docs/algorithm.md §10), tested against each other."""

    REFERENCE = "reference"  #: per tensor, in the accumulation dtype (hf_am.reference): the oracle
    MULTI_TENSOR = "foreach"  #: torch._foreach_* ops, CPU tiles (hf_am.multi_tensor)
    FUSED = "fused"  #: a compiled kernel set (hf_am.kernels)


@dataclass
class GroupPlan:
    """What one step does with one param group."""

    group: Dict[str, Any]
    params: List[torch.Tensor]  # the optimizer's parameters (maybe DTensors)
    local_params: List[torch.Tensor]
    local_grads: List[torch.Tensor]  # an empty shard without a gradient gets an empty zero tensor
    scope_ids: List[int] = field(default_factory=list)
    keys: List[Hashable] = field(default_factory=list)  # reduction key per tensor (hf_am.sharding)
    positions: List[int] = field(default_factory=list)  # each param's index among the call's params
    indices: List[int] = field(default_factory=list)  # each param's index in its group (for messages)
    path: Path = Path.MULTI_TENSOR
    kernels: Any = None  # for Path.FUSED: the kernel set (a hf_am.kernels.KernelSet)
    #: the local per-element state lists (the names every parameter has, in ``state_tensor_names`` order)
    #: as the gate's bulk check read them, before this step created any state; ``None``: not gathered
    state_tensors: Optional[List[List[torch.Tensor]]] = None
    group_index: int = 0
    why: str = ""  # why this path (e.g. why the kernels declined)
    scratch: Any = None  # what phase 1 leaves for phase 2 (e.g. AdamW's denominators)


@dataclass
class Layout:
    """What a step() call looks like from the param groups alone, whatever holds a gradient.

    The scopes and the collectives follow from it, so every rank runs the same
    collectives of the same size even when ranks disagree on which parameters
    have gradients; that disagreement is caught inside the one collective.
    """

    n_scopes: int
    hyper_of_scope: List[Hyperparameters]
    groups_for_key: Dict[Hashable, Sequence]  # every reduction key of the call's params
    signature: tuple
    acc: torch.dtype  # of the scope sums and coefficients: float64 always (no overflow where AdamW has none)
    device: Optional[torch.device]


def plan_step(optimizer) -> Tuple[List[GroupPlan], Layout]:
    """Validate everything a step will touch and lay out its scopes; mutate nothing."""
    scope, sharded_opt = optimizer.scope, optimizer.process_group is not None
    call_groups = list(optimizer.param_groups)
    _check_groups_whole(optimizer, call_groups, sharded_opt)
    plans: List[GroupPlan] = []
    offset = 0
    hyper_of_scope: List[Hyperparameters] = []
    all_keys: Dict[Hashable, Sequence] = {}
    acc, device = torch.float64, None
    for group_index, group in enumerate(call_groups):
        hyper = optimizer.hyperparameters_of(group)
        if scope == "tensor":
            hyper_of_scope.extend([hyper] * len(group["params"]))
        elif scope == "group" or group_index == 0:
            hyper_of_scope.append(hyper)
        params, local_params, local_grads, positions, keys, indices, first = _group_tensors(
            optimizer, group, offset, sharded_opt, all_keys
        )
        device = device or first
        if params:
            plan = GroupPlan(group=group, params=params, local_params=local_params, local_grads=local_grads)
            plan.group_index, plan.indices = group_index, indices
            # The gate, before a path (or kernel) sees a tensor; where it accepted the plan in bulk, the state
            # lists it read mirror the parameters, and the path choice need look at the parameters only.
            mirrored = check_plan_tensors(optimizer, plan)
            states = plan.state_tensors if mirrored else state_lists(optimizer, params)
            plan.path, plan.kernels, plan.why = choose_path(group, group_index, [local_params, local_grads, *states], mirrored)
            plan.positions, plan.keys = positions, keys
            if scope == "model":
                plan.scope_ids = [0] * len(params)
            elif scope == "group":
                plan.scope_ids = [group_index] * len(params)
            else:
                plan.scope_ids = list(positions)
            plans.append(plan)
        offset += len(group["params"])
    _check_model_scope_agrees(optimizer, plans)
    signature = (scope, tuple(len(g["params"]) for g in call_groups), tuple(all_keys), optimizer._load_count)
    return plans, Layout(len(hyper_of_scope), hyper_of_scope, all_keys, signature, acc, device)


def _group_tensors(optimizer, group, offset: int, sharded_opt: bool, all_keys: Dict[Hashable, Sequence]):
    """``(params, local params, local gradients, positions, reduction keys, indices, device of the first
    parameter)`` of the group's parameters that step; adds every parameter's reduction key to ``all_keys``
    (with or without a gradient: the collectives follow the param groups alone)."""
    params = list(group["params"])
    plain_grads = _plain_gradients(group)
    if plain_grads is not None:  # the common case, in bulk: the loop below gives the same lists
        n = len(params)
        key, pgroups = reduction_groups(params[0], optimizer.process_group)  # one key for all plain tensors
        if key is not None:
            all_keys.setdefault(key, pgroups)
        return params, list(params), plain_grads, list(range(offset, offset + n)), [key] * n, list(range(n)), params[0].device
    stepping, local_params, local_grads, positions, keys, indices, first = [], [], [], [], [], [], None
    for pos, p in enumerate(params):
        key, pgroups = reduction_groups(p, optimizer.process_group)
        if key is not None:
            all_keys.setdefault(key, pgroups)
        local_p = local_view(p)
        first = first or local_p.device
        grad_view = _local_gradient(optimizer, p, local_p, sharded_opt)
        if grad_view is None:
            continue
        if group.get("maximize", False):
            grad_view = torch.neg(grad_view)  # a new tensor: the .grad stays as it is
        stepping.append(p)
        local_params.append(local_p)
        local_grads.append(grad_view)
        positions.append(offset + pos)
        indices.append(pos)
        keys.append(key)
    return stepping, local_params, local_grads, positions, keys, indices, first


def state_lists(optimizer, params) -> List[List[torch.Tensor]]:
    """The local views of the state tensors a kernel will touch, one list per state name
    (only names every parameter already has; state created this step is built like its parameter)."""
    states = [optimizer.state.get(p) or {} for p in params]
    return [
        [local_view(s[name]) for s in states]
        for name in optimizer.state_tensor_names
        if all(name in s for s in states)
    ]


_PLAIN_PARAMETERS = frozenset((torch.Tensor, torch.nn.Parameter))  # not DTensors (nor other subclasses)
_GRAD = operator.attrgetter("grad")
_DTYPE = operator.attrgetter("dtype")
_IS_SPARSE = operator.attrgetter("is_sparse")


def _plain_gradients(group) -> Optional[List[torch.Tensor]]:
    """The gradients of a group whose parameters are all plain tensors with plain, dense, real
    gradients and ``maximize`` off (what most steps see), read in bulk; else ``None``, and
    :func:`plan_step` takes its per-parameter loop (DTensors, missing gradients, errors)."""
    params = group["params"]
    if not params or group.get("maximize", False) or not set(map(type, params)) <= _PLAIN_PARAMETERS:
        return None
    grads = list(map(_GRAD, params))
    if set(map(type, grads)) != {torch.Tensor} or any(map(_IS_SPARSE, grads)):
        return None
    if any(dtype.is_complex for dtype in {*map(_DTYPE, grads), *map(_DTYPE, params)}):
        return None
    return grads


def _local_gradient(optimizer, p, local_p, sharded_opt) -> Optional[torch.Tensor]:
    """This rank's gradient of ``p``, a zero tensor for an empty shard without one, or ``None`` (skip)."""
    grad = p.grad
    if grad is None:
        # An empty shard still takes part in the collective (with zeros).
        if not ((sharded_opt or local_p is not p) and local_p.numel() == 0):
            return None
        return torch.zeros_like(local_p)
    if grad.is_sparse:
        raise RuntimeError(f"{type(optimizer).__name__} does not support sparse gradients")
    if grad.is_complex() or p.is_complex():
        raise TypeError(f"{type(optimizer).__name__} supports real tensors only, got a {grad.dtype} gradient")
    return local_view(grad)


def _check_groups_whole(optimizer, call_groups, sharded_opt) -> None:
    """Refuse param groups that a wrapper flattened or sharded behind the optimizer's back.

    Without ``process_group`` every tensor must be whole: DeepSpeed (``deepspeed.initialize``,
    accelerate's DeepSpeed plugin) replaces each group's tensors with one flat partition per rank,
    and FSDP1 marks its flat parameters; summed locally, each rank would compute its own
    coefficient.  Under a flat partition (``process_group`` set), refuse scopes a wrapper split
    across step() calls.
    """
    if not sharded_opt:
        _check_not_sharded_unseen(optimizer, call_groups)
        return
    if optimizer.scope == "model":
        missing = optimizer._init_num_groups - sum(1 for g in call_groups if g["params"] or not g[INIT_TENSORS])
        if missing > 0:
            raise ValueError(
                "scope='model' spans all parameter groups, but this step() call sees "
                f"{len(call_groups) - missing} of {optimizer._init_num_groups}: the caller (DeepSpeed ZeRO) steps "
                "parameter groups separately. Put every parameter in one group, or use scope='group'/'tensor'"
            )
    if optimizer.scope == "tensor":
        for group_index, group in enumerate(call_groups):
            if group["params"] and len(group["params"]) < group[INIT_TENSORS]:
                raise ValueError(
                    f"scope='tensor' needs one parameter group per tensor under a flat partition: param group "
                    f"{group_index} had {group[INIT_TENSORS]} tensors and now holds {len(group['params'])} "
                    "(DeepSpeed ZeRO flattened them). Build the optimizer with hf_am.param_groups_per_tensor(...)"
                )


_ATTACH_HINT = (
    "Call hf_am.attach(engine_or_optimizer, model=None) once after deepspeed.initialize / accelerator.prepare "
    "(pass model= for FSDP1), which wires the optimizer to the group that shards its state; the Trainer does "
    "this by itself"
)


def _check_not_sharded_unseen(optimizer, call_groups) -> None:
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    for index, group in enumerate(call_groups):
        params = group["params"]
        if len(params) != group[INIT_TENSORS]:
            raise RuntimeError(
                f"{type(optimizer).__name__}: param group {index} had {group[INIT_TENSORS]} tensors when it was added "
                f"and holds {len(params)} now: a wrapper (DeepSpeed ZeRO) flattened or partitioned it, and no "
                f"reduction group is set, so every rank would compute its own coefficient. {_ATTACH_HINT}. "
                "Nothing was changed by this step."
            )
        if distributed and any(getattr(p, "_fsdp_flattened", False) for p in params):
            raise RuntimeError(
                f"{type(optimizer).__name__}: param group {index} holds FSDP1-sharded parameters (FullyShardedDataParallel "
                f"flattened them) and no reduction group is set, so every rank would compute its own coefficient. "
                f"{_ATTACH_HINT}. Nothing was changed by this step."
            )


def _check_model_scope_agrees(optimizer, plans: List[GroupPlan]) -> None:
    if optimizer.scope != "model" or len(plans) <= 1:
        return
    first = optimizer.hyperparameters_of(plans[0].group)
    for plan in plans[1:]:
        other = optimizer.hyperparameters_of(plan.group)
        if other != first:
            raise ValueError(
                "scope='model' computes one beta for all parameter groups, so their lam, beta_min, "
                f"beta_max and restart_threshold must agree; got {tuple(first)} and {tuple(other)}"
            )


def choose_path(group, group_index: int, lists, mirrored: bool = False) -> Tuple[Path, Any, str]:
    """``(path, kernels, why)``: which implementation steps this group, decided before anything is mutated.

    ``lists``: parallel lists of every tensor the step touches (parameters,
    gradients, existing state).  ``fused=None`` (default) takes a compiled kernel
    set where one accepts them (:func:`hf_am.kernels.select_kernels`): plain C for
    dense float32/float64 CPU tensors (when a C compiler is there), Triton for
    dense float32/bfloat16/float16 CUDA tensors (when Triton is there); otherwise
    the multi-tensor path, or the per-tensor reference path for ``foreach=False``
    and low-precision tensors without kernels.  ``fused=True`` insists on the
    kernels.  ``why`` says in words why the path was taken.  ``mirrored``: every later list is known to
    mirror the parameters (:func:`hf_am.gate.check_plan_tensors` accepted them in bulk).
    """
    fused, foreach = group.get("fused"), group.get("foreach")
    reason = ""
    if fused is not False and foreach is None:
        kernels, reason = kernel_sets.select_kernels(lists, mirrored)
        if kernels is not None:
            return Path.FUSED, kernels, f"the {kernels.NAME} kernels accept every tensor"
        if fused:
            raise RuntimeError(f"fused=True cannot step param group {group_index}: {reason}. Use fused=None to fall back")
        reason = f"compiled kernels declined: {reason}; "
    elif fused is False:
        reason = "fused=False; "
    if foreach is False:
        return Path.REFERENCE, None, reason + "foreach=False"
    if is_low_precision([*lists[0], *lists[1]]):
        return Path.REFERENCE, None, reason + "low-precision tensors take the per-tensor reference path"
    return Path.MULTI_TENSOR, None, reason + "multi-tensor path"
