"""Machinery shared by AM-AdamW and AM-SGD.

A step has two phases.  Phase 1 (optimizer specific) turns every tensor into
three partial sums.  In between, this module adds them up per *scope*, runs the
one collective sharded parameters need, and evaluates :func:`adaptive_beta`.
Phase 2 (optimizer specific) applies the update with the per-tensor coefficient.
Everything between the phases is tensor arithmetic, so ``step()`` never waits
for the device.
"""

from __future__ import annotations

import math
import zlib
from array import array
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Dict, Hashable, List, Optional, Sequence

import torch

from . import _cpu_kernels as cpu_kernels
from ._beta import adaptive_beta, effective_momentum
from ._sharding import (
    all_reduce_sum,
    gather_objects,
    local_view,
    optional_numel,
    reduction_groups,
)

SCOPES = ("model", "group", "tensor")
LOSS_ESTIMATES = ("linear", "exact")

# Scalar state kept per parameter (replicated over the parameters of a scope, so
# every piece of state travels with its parameter when checkpoints are resharded).
PROD = "am_prod"  # product of the effective coefficients (AM-AdamW bias correction)
BETA = "am_beta"  # the scope's beta of the latest step
RESTARTS = "am_restarts"  # number of momentum restarts of the scope so far
PREV_LOSS = "am_prev_loss"  # loss of the previous step (loss_estimate="exact")
# Param-group keys.
PREV_LR = "am_prev_lr"
INIT_TENSORS = "am_init_tensors"
INIT_NUMEL = "am_init_numel"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums accumulate in float32, or float64 for float64 parameters."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_low_precision(tensors) -> bool:
    """True when the tensors are not all of one float32/float64 dtype (the fast path's assumption)."""
    return any(t.dtype != accumulation_dtype(t.dtype) for t in tensors) or len({t.dtype for t in tensors}) > 1


def _check_range(name: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} (allowed: {allowed})")


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) or (
        isinstance(value, torch.Tensor) and value.numel() == 1
    )


@dataclass
class GroupPlan:
    """What one step does with one param group (built before anything is mutated)."""

    group: Dict[str, Any]
    params: List[torch.Tensor]  # the optimizer's parameters (maybe DTensors)
    local_params: List[torch.Tensor]
    local_grads: List[torch.Tensor]  # an empty shard without a gradient gets an empty zero tensor
    scope_ids: List[int] = field(default_factory=list)
    keys: List[Hashable] = field(default_factory=list)
    positions: List[int] = field(default_factory=list)  # each param's index among the call's params
    path: str = "foreach"  # "reference", "foreach" or "fused" (see AMOptimizer._choose_path)
    kernels: Any = None  # for "fused": the kernel module (_cpu_kernels or _triton_kernels)
    scratch: Any = None  # what phase 1 leaves for phase 2 (e.g. AdamW's denominators)


@dataclass
class Layout:
    """What a step() call looks like from the param groups alone, whatever holds a gradient.

    The scopes and the collectives follow from it, so every rank runs the same
    collectives of the same size even when ranks disagree on which parameters
    have gradients; that disagreement is caught inside the one collective.
    """

    n_scopes: int
    hyper_of_scope: List[tuple]  # (lam, beta_min, beta_max, threshold) per scope
    groups_for_key: Dict[Hashable, Sequence]  # every reduction key of the call's params
    signature: tuple
    acc: torch.dtype  # of the sums: float64 when any parameter is float64
    device: Optional[torch.device]


class AMOptimizer(torch.optim.Optimizer):
    """Base class: validation, scopes, sharded sums, statistics, checkpoints."""

    #: param-group key holding ``beta_max``
    beta_max_key: str = ""

    def __init__(
        self,
        params,
        defaults: Dict[str, Any],
        *,
        scope: str,
        loss_estimate: str,
        process_group=None,
    ):
        if scope not in SCOPES:
            raise ValueError(f"Invalid scope: {scope!r} (allowed: {', '.join(map(repr, SCOPES))})")
        if loss_estimate not in LOSS_ESTIMATES:
            raise ValueError(
                f"Invalid loss_estimate: {loss_estimate!r} (allowed: {', '.join(map(repr, LOSS_ESTIMATES))})"
            )
        if loss_estimate == "exact" and scope != "model":
            raise ValueError(
                f"loss_estimate='exact' needs scope='model', got scope={scope!r}: the loss is one "
                "number for the whole model, so only a model-wide scope has an exact loss difference"
            )
        self.scope = scope
        self.loss_estimate = loss_estimate
        self.process_group = process_group
        self._verified_signatures: set = set()
        self._load_count = 0  # part of the layout signature: a resumed run checks its layout again
        self._layout_mismatch: Optional[torch.Tensor] = None
        self._device_constants: Dict[Any, Any] = {}
        self._scope_reps: Dict[Hashable, Dict[str, Any]] = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def _validate_group(self, group: Dict[str, Any]) -> None:
        """Optimizer-specific checks; subclasses extend and call super()."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                raise ValueError(f"Invalid learning rate: a tensor lr must have one element, got shape {tuple(lr.shape)}")
        else:
            _check_range("learning rate", lr, _is_real(lr) and lr >= 0.0, "lr >= 0")
        wd = group["weight_decay"]
        _check_range("weight_decay", wd, _is_real(wd) and wd >= 0.0, "weight_decay >= 0")
        lam = group["lam"]
        _check_range("lam", lam, _is_real(lam) and lam >= 0.0, "lam >= 0")
        beta_max = group[self.beta_max_key]
        beta_min = group["beta_min"]
        name = "betas[0] (beta_max)" if self.beta_max_key == "betas" else f"{self.beta_max_key} (beta_max)"
        bmax = beta_max[0] if self.beta_max_key == "betas" else beta_max
        _check_range(name, bmax, _is_real(bmax) and 0.0 <= bmax < 1.0, "0 <= beta_max < 1")
        _check_range("beta_min", beta_min, _is_real(beta_min) and 0.0 <= beta_min <= bmax, f"0 <= beta_min <= beta_max = {bmax}")
        for flag in ("foreach", "fused"):
            value = group.get(flag)
            if not (value is None or isinstance(value, bool)):
                raise TypeError(f"Invalid {flag}: {value!r} (allowed: None, True, False)")
        if group.get("fused") and group.get("foreach") is not None:
            raise ValueError(
                f"fused=True and foreach={group['foreach']!r} exclude each other: fused picks the compiled "
                "kernels (C on CPU, Triton on CUDA), foreach the multi-tensor (True) or per-tensor (False) path"
            )
        threshold = group["restart_threshold"]
        if threshold is not None:
            _check_range(
                "restart_threshold", threshold, _is_real(threshold) and 0.0 < threshold <= 1.0, "None or 0 < restart_threshold <= 1"
            )

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
        except Exception:
            self.param_groups.pop()
            raise
        for p in group["params"]:
            if p.is_complex():
                self.param_groups.pop()
                raise TypeError(f"AM optimizers support real parameters only, got a {p.dtype} parameter")
        # Remember the group's shape before anybody (DeepSpeed) flattens it, so a
        # scope that a wrapper splits across step() calls can be detected.
        group.setdefault(INIT_TENSORS, len(group["params"]))
        group.setdefault(INIT_NUMEL, sum(optional_numel(p) for p in group["params"]))
        self._init_num_groups = len(self.param_groups)

    def beta_max_of(self, group: Dict[str, Any]) -> float:
        value = group[self.beta_max_key]
        return value[0] if self.beta_max_key == "betas" else value

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; ``closure`` (re)computes the loss and gradients.

        With ``loss_estimate="exact"`` the loss the closure returns replaces the
        first-order estimate of ``f(x_t) - f(x_{t-1})``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.loss_estimate == "exact" and loss is None:
            raise ValueError(
                "loss_estimate='exact' needs the loss: call step(closure) with a closure that returns it"
            )
        plans, layout = self._plan()
        if not plans and not layout.groups_for_key:
            return loss
        self._check_sharded_layout(plans, layout)
        self._init_state(plans)

        # Phase 1: per-tensor partial sums [<d,d>, <g,d>, <g-d,g-d>] (metric of the optimizer).
        partials = [self._partial_sums(plan) for plan in plans]
        n_scopes, acc, device = layout.n_scopes, layout.acc, layout.device
        exact_delta = self._loss_delta(plans, loss, acc, device)

        # Weight by the learning rates (ALGORITHM.md section 2) and sum per scope.
        by_key: Dict[Hashable, List[torch.Tensor]] = {}
        index_by_key: Dict[Hashable, List[int]] = {}
        groups_by_key: Dict[Hashable, Sequence] = {}
        for plan, sums in zip(plans, partials):
            eta = plan.group["lr"]
            eta_prev = plan.group.get(PREV_LR, eta)
            weight_b = eta if exact_delta is not None else eta + eta_prev
            sums = sums.to(acc)
            weighted = torch.stack((sums[:, 0] * eta, sums[:, 1] * weight_b, sums[:, 2] * eta), dim=1)
            for i, key in enumerate(plan.keys):
                by_key.setdefault(key, []).append(weighted[i])
                index_by_key.setdefault(key, []).append(plan.scope_ids[i])
        scope_sums = torch.zeros(n_scopes, 3, dtype=acc, device=device)
        if None in by_key:  # whole tensors: nothing to reduce
            scope_sums.index_add_(0, self._index_tensor(index_by_key[None], device), torch.stack(by_key[None]))
        mismatch = None
        for key, pgroups in layout.groups_for_key.items():  # param order: the same keys, in the same order, on every rank
            # Two extra rows carry [1, h1, h2], [h3, 0, 0]: a fingerprint of which of the key's
            # parameters have a gradient here; after the sum, sum(h) == count * h on every rank
            # that agrees with all others.
            present = _positions_with_gradients(plans, key)
            header, hashes = self._fingerprint(key, present, acc, device)
            part = torch.cat((torch.zeros(n_scopes, 3, dtype=acc, device=device), header))
            if key in by_key:
                part.index_add_(0, self._index_tensor(index_by_key[key], device), torch.stack(by_key[key]))
            all_reduce_sum(part, pgroups)
            count = part[n_scopes, 0]
            bad = (part[n_scopes, 1] != count * hashes[0]) | (part[n_scopes, 2] != count * hashes[1])
            bad = bad | (part[n_scopes + 1, 0] != count * hashes[2])
            mismatch = bad if mismatch is None else mismatch | bad
            scope_sums += part[:n_scopes]
        if mismatch is not None:
            self._on_layout_mismatch(mismatch, plans, layout)

        # The coefficient, once per scope.
        lam, beta_min, beta_max, threshold = self._scope_hyperparameters(layout, acc, device)
        beta = adaptive_beta(scope_sums[:, 0], scope_sums[:, 1], scope_sums[:, 2], lam, beta_min, beta_max, exact_delta)
        if threshold is None:
            restart = torch.zeros_like(beta)
            beta_step = beta_used = beta
        else:  # non-adaptive momentum, reset when the adaptive beta drops (ALGORITHM.md section 5)
            restart = (beta < threshold).to(acc)
            beta_step = torch.full_like(beta, beta_max) if isinstance(beta_max, float) else beta_max.clone()
            beta_used = beta_step * (1.0 - restart)  # reported: 0 on a restart step (no memory kept)
        beta_eff = effective_momentum(beta_step, lam)
        if mismatch is not None and device.type != "cpu":
            # Ranks disagreed (see _on_layout_mismatch): keep every momentum as it is.
            beta_eff = torch.where(mismatch, torch.ones_like(beta_eff), beta_eff)
            restart = torch.where(mismatch, torch.zeros_like(restart), restart)

        # Phase 2: the update, then the bookkeeping the next step needs.
        for plan in plans:
            idx = self._index_tensor(plan.scope_ids, device)
            self._apply_update(plan, beta_eff.index_select(0, idx), restart.index_select(0, idx))
            self._record(plan, beta_used.index_select(0, idx), restart.index_select(0, idx), loss, acc)
            lr = plan.group["lr"]  # a tensor lr is updated in place by schedulers: keep a copy
            plan.group[PREV_LR] = lr.detach().clone() if isinstance(lr, torch.Tensor) else lr
        return loss

    # ----------------------------------------------------------- the pieces
    def _plan(self):
        """Validate everything a step will touch and lay out its scopes; mutate nothing.

        Returns ``(plans, layout)``: one plan per param group with gradients, and
        the call's :class:`Layout`, which depends on the param groups only.
        """
        sharded_opt = self.process_group is not None
        plans: List[GroupPlan] = []
        call_groups = [g for g in self.param_groups]
        if self.scope == "model" and sharded_opt:
            missing = self._init_num_groups - sum(1 for g in call_groups if g["params"] or not g[INIT_TENSORS])
            if missing > 0:
                raise ValueError(
                    "scope='model' spans all parameter groups, but this step() call sees "
                    f"{len(call_groups) - missing} of {self._init_num_groups}: the caller (DeepSpeed ZeRO) steps "
                    "parameter groups separately. Put every parameter in one group, or use scope='group'/'tensor'"
                )
        offset = 0
        hyper_of_scope: List[tuple] = []
        all_keys: Dict[Hashable, Sequence] = {}
        acc, device = torch.float32, None
        for group_index, group in enumerate(call_groups):
            if self.scope == "tensor" and sharded_opt and group["params"] and len(group["params"]) < group[INIT_TENSORS]:
                raise ValueError(
                    f"scope='tensor' needs one parameter group per tensor under a flat partition: param group "
                    f"{group_index} had {group[INIT_TENSORS]} tensors and now holds {len(group['params'])} "
                    "(DeepSpeed ZeRO flattened them). Build the optimizer with hf_am.param_groups_per_tensor(...)"
                )
            hyper = self._hyper_tuple(group)
            if self.scope == "tensor":
                hyper_of_scope.extend([hyper] * len(group["params"]))
            elif self.scope == "group" or group_index == 0:
                hyper_of_scope.append(hyper)
            params, local_params, local_grads, positions, keys = [], [], [], [], []
            for pos, p in enumerate(group["params"]):
                key, pgroups = reduction_groups(p, self.process_group)
                if key is not None:
                    all_keys.setdefault(key, pgroups)
                grad = p.grad
                local_p = local_view(p)
                device = device or local_p.device
                if local_p.dtype == torch.float64:
                    acc = torch.float64
                if grad is None:
                    # An empty shard still takes part in the collective (with zeros).
                    if not ((sharded_opt or local_p is not p) and local_p.numel() == 0):
                        continue
                    grad_view = torch.zeros_like(local_p)
                else:
                    if grad.is_sparse:
                        raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                    if grad.is_complex() or p.is_complex():
                        raise TypeError(f"{type(self).__name__} supports real tensors only, got a {grad.dtype} gradient")
                    grad_view = local_view(grad)
                params.append(p)
                local_params.append(local_p)
                local_grads.append(grad_view)
                positions.append(offset + pos)
                keys.append(key)
            if params:
                plan = GroupPlan(group=group, params=params, local_params=local_params, local_grads=local_grads)
                plan.path, plan.kernels = self._choose_path(group, group_index, [local_params, local_grads])
                plan.positions, plan.keys = positions, keys
                if self.scope == "model":
                    plan.scope_ids = [0] * len(params)
                elif self.scope == "group":
                    plan.scope_ids = [group_index] * len(params)
                else:
                    plan.scope_ids = list(positions)
                plans.append(plan)
            offset += len(group["params"])
        if self.scope == "model" and len(plans) > 1:
            first = self._hyper_tuple(plans[0].group)
            for plan in plans[1:]:
                if self._hyper_tuple(plan.group) != first:
                    raise ValueError(
                        "scope='model' computes one beta for all parameter groups, so their lam, beta_min, "
                        f"beta_max and restart_threshold must agree; got {first} and {self._hyper_tuple(plan.group)}"
                    )
        signature = (self.scope, tuple(len(g["params"]) for g in call_groups), tuple(all_keys), self._load_count)
        layout = Layout(len(hyper_of_scope), hyper_of_scope, all_keys, signature, acc, device)
        return plans, layout

    @staticmethod
    def _choose_path(group, group_index: int, lists):
        """``(path, kernels)``: which implementation steps this group, decided before anything is mutated.

        ``fused=None`` (default) takes compiled kernels where they apply: plain C
        for contiguous float32/float64 CPU tensors (when a C compiler is there),
        Triton for contiguous float32/bfloat16/float16 CUDA tensors (when Triton
        is there); otherwise the multi-tensor path, or the per-tensor reference
        path for ``foreach=False`` and low-precision tensors without kernels.
        ``fused=True`` insists on the kernels.
        """
        fused, foreach = group.get("fused"), group.get("foreach")
        if fused is not False and foreach is None:
            kernels, reason = fused_kernels(lists)
            if kernels is not None:
                return "fused", kernels
            if fused:
                raise RuntimeError(f"fused=True cannot step param group {group_index}: {reason}. Use fused=None to fall back")
        if foreach is False or is_low_precision([*lists[0], *lists[1]]):
            return "reference", None
        return "foreach", None

    def _hyper_tuple(self, group):
        return (group["lam"], group["beta_min"], self.beta_max_of(group), group["restart_threshold"])

    def _check_sharded_layout(self, plans: List[GroupPlan], layout: Layout) -> None:
        """Before the first collective of a new layout, check every rank agrees on it.

        Runs (with a host sync) only when the param groups' layout is new (the
        first step, after ``load_state_dict`` or a new param group), which every
        rank meets at the same step; which parameters hold gradients is checked
        at every step inside the sums' collective instead (:meth:`_fingerprint`).
        """
        if not layout.groups_for_key or layout.signature in self._verified_signatures:
            return
        for key, pgroups in layout.groups_for_key.items():
            present = _positions_with_gradients(plans, key)
            for pg in pgroups:
                gathered = gather_objects((layout.n_scopes, present), pg)
                counts = [g[0] for g in gathered]
                if len(set(counts)) != 1 or len({tuple(g[1]) for g in gathered}) != 1:
                    raise ValueError(
                        f"Ranks disagree on the scopes of this step: numbers of scopes per rank {counts}, "
                        f"parameters with gradients per rank {[len(g[1]) for g in gathered]} (scope={self.scope!r}). "
                        "Every rank must hold the same param groups in the same order, with the same tensors "
                        "(an empty shard is fine), and the same of them must have gradients"
                    )
            if key[0] == "process_group":
                self._check_not_split(plans, key, pgroups)
        self._verified_signatures.add(layout.signature)

    def _fingerprint(self, key, present: tuple, acc, device):
        """Header rows ``[[1, h1, h2], [h3, 0, 0]]`` (cached on the device) and ``(h1, h2, h3)``.

        ``h`` are three bytes of a CRC of the positions of this rank's parameters
        with a gradient.  Bytes keep ``count * h`` exact in float32 for up to
        65,000 ranks; the cache keeps steady-state steps free of host-to-device copies.
        """
        cache_key = ("fingerprint", key, present, acc, device)
        hit = self._device_constants.get(cache_key)
        if hit is None:
            crc = zlib.crc32(array("q", present).tobytes())
            hashes = (float(crc & 0xFF), float((crc >> 8) & 0xFF), float((crc >> 16) & 0xFF))
            header = torch.tensor([[1.0, hashes[0], hashes[1]], [hashes[2], 0.0, 0.0]], dtype=acc, device=device)
            if len(self._device_constants) > 256:
                self._device_constants.clear()
            hit = self._device_constants[cache_key] = (header, hashes)
        return hit

    def _on_layout_mismatch(self, mismatch: torch.Tensor, plans, layout) -> None:
        """Ranks disagree on which parameters have gradients: the sums mix different layouts.

        CPU sums (gloo, ZeRO-Offload) are read at no cost: raise now, on every rank
        that sees the disagreement, before any parameter moves.  Device sums are
        not read inside step(): the step keeps every momentum as it is, and
        :meth:`check_layout` (called by ``beta``/``beta_stats()`` and the Trainer
        callback) raises.
        """
        if mismatch.device.type != "cpu":
            self._layout_mismatch = mismatch if self._layout_mismatch is None else self._layout_mismatch | mismatch
            return
        if bool(mismatch):
            n_present = sum(len(plan.params) for plan in plans)
            raise RuntimeError(
                self._mismatch_message(
                    f"this rank has gradients for {n_present} parameter tensors",
                    "parameters and momenta are unchanged by this step; its step counts (and, off the compiled "
                    "kernels, AM-AdamW's second moments) already include it",
                )
            )

    def _mismatch_message(self, detail: str, consequence: str) -> str:
        return (
            "Ranks disagree on which parameters have gradients in this step() call "
            f"({detail}): the sharded sums of the beta formula would mix different parameters. Every rank "
            f"must give gradients to the same parameters (an empty shard's missing gradient is fine); {consequence}"
        )

    def check_layout(self) -> None:
        """Raise if an earlier device step found ranks disagreeing on which parameters have gradients (syncs)."""
        flag = self._layout_mismatch
        if flag is not None and bool(flag):
            raise RuntimeError(
                self._mismatch_message(
                    "detected on the device, at an earlier step",
                    "the steps that found it kept every momentum unchanged instead of using the mixed sums",
                )
            )

    def _check_not_split(self, plans, key, pgroups) -> None:
        """Under a flat partition a group/model scope must be whole in this call."""
        if self.scope == "tensor":
            return
        local = {}
        expected = {}
        for plan in plans:
            sid = plan.scope_ids[0]
            local[sid] = local.get(sid, 0) + sum(lp.numel() for lp, k in zip(plan.local_params, plan.keys) if k == key)
            # Tensors reduced over another group (or none) are whole here: not part of this count.
            others = sum(optional_numel(p) for p, k in zip(plan.params, plan.keys) if k != key)
            expected[sid] = expected.get(sid, 0) + plan.group[INIT_NUMEL] - others
        total = dict(local)
        for pg in pgroups:
            gathered = gather_objects(total, pg)
            total = {sid: sum(g[sid] for g in gathered) for sid in total}
        for sid, n in total.items():
            if n < expected[sid]:
                raise ValueError(
                    f"scope={self.scope!r}: this step() call holds {n} of the {expected[sid]} elements of a scope "
                    "across all ranks, so the caller (DeepSpeed ZeRO-3 sub-groups?) splits the scope across "
                    "step() calls. Use scope='tensor' with one group per tensor, or a sub_group_size that "
                    "keeps each group whole"
                )

    def _index_tensor(self, ids: List[int], device) -> torch.Tensor:
        key = ("index", device, tuple(ids))
        t = self._device_constants.get(key)
        if t is None:
            if len(self._device_constants) > 256:
                self._device_constants.clear()
            t = torch.tensor(ids, dtype=torch.long, device=device)
            self._device_constants[key] = t
        return t

    def _scope_hyperparameters(self, layout: Layout, acc, device):
        """(lam, beta_min, beta_max, threshold): Python floats when uniform, else per-scope tensors."""
        per_scope = layout.hyper_of_scope
        values = set(per_scope)
        if len(values) == 1:
            lam, bmin, bmax, thr = next(iter(values))
            return float(lam), float(bmin), float(bmax), (None if thr is None else float(thr))
        thresholds = {h[3] is None for h in values}
        if len(thresholds) != 1:
            raise ValueError("restart_threshold must be set for all parameter groups or for none")
        columns = []
        for j in range(4):
            if j == 3 and next(iter(thresholds)):
                columns.append(None)
                continue
            key = ("hyper", j, device, acc, tuple(float(h[j]) for h in per_scope))
            t = self._device_constants.get(key)
            if t is None:
                t = torch.tensor(key[-1], dtype=acc, device=device)
                self._device_constants[key] = t
            columns.append(t)
        return tuple(columns)

    def _loss_delta(self, plans, loss, acc, device) -> Optional[torch.Tensor]:
        if self.loss_estimate != "exact":
            return None
        states = [self.state[p] for plan in plans for p in plan.params]
        if not states or not all(PREV_LOSS in s for s in states):
            return None  # first step: the linear estimate
        prev = states[0][PREV_LOSS]
        current = torch.as_tensor(loss).detach().to(device=device, dtype=acc)
        return current - prev.to(acc)

    def _record(self, plan: GroupPlan, beta_used, restart, loss, acc) -> None:
        """Store the scope's beta, restart count and (exact mode) the loss in every member's state."""
        states = [self.state[p] for p in plan.params]
        for i, (state, pos) in enumerate(zip(states, plan.positions)):
            if self.scope == "tensor":
                self._scope_reps[(id(plan.group), pos)] = state
            elif i == 0:
                self._scope_reps["model" if self.scope == "model" else id(plan.group)] = state
        betas = list(beta_used.unbind(0))
        torch._foreach_copy_([s[BETA] for s in states], betas)
        torch._foreach_add_([s[RESTARTS] for s in states], list(restart.unbind(0)))
        if self.loss_estimate == "exact":
            value = torch.as_tensor(loss).detach()
            for s in states:
                s[PREV_LOSS] = value.to(device=s[BETA].device, dtype=s[BETA].dtype).clone()

    def _new_scalar_state(self, state: Dict[str, Any], local_p: torch.Tensor) -> None:
        acc = accumulation_dtype(local_p.dtype)
        state["step"] = torch.zeros((), dtype=torch.float32, device=local_p.device)
        state[BETA] = torch.zeros((), dtype=acc, device=local_p.device)
        state[RESTARTS] = torch.zeros((), dtype=acc, device=local_p.device)

    # ------------------------------------------------- subclass responsibilities
    def _init_state(self, plans: List[GroupPlan]) -> None:
        raise NotImplementedError

    def _partial_sums(self, plan: GroupPlan) -> torch.Tensor:
        """``(n_tensors, 3)`` tensor of ``[<d,d>, <g,d>, <g-d,g-d>]`` per tensor (unweighted by lr)."""
        raise NotImplementedError

    def _apply_update(self, plan: GroupPlan, beta_eff: torch.Tensor, restart: torch.Tensor) -> None:
        raise NotImplementedError

    # -------------------------------------------------------------- statistics
    def _scope_states(self) -> List[Dict[str, Any]]:
        """State of one representative parameter per scope, as of each scope's latest step.

        Kept by :meth:`_record` rather than read from ``param_groups``, because
        DeepSpeed ZeRO swaps the groups around ``step()`` calls.
        """
        if self._scope_reps:
            return list(self._scope_reps.values())
        reps: List[Dict[str, Any]] = []  # after load_state_dict, before the next step
        for group in self.param_groups:
            members = [self.state[p] for p in group["params"] if BETA in self.state.get(p, {})]
            if members:
                reps.extend(members if self.scope == "tensor" else members[:1])
        return reps[:1] if self.scope == "model" else reps

    def beta_summary_tensor(self) -> torch.Tensor:
        """``[mean, min, max, restarts]`` of the latest step over scopes, on the device, without a host sync.

        ``restarts`` is the total number of momentum restarts so far, summed over
        scopes.  Accumulate this tensor between logging steps and read it once.
        """
        reps = self._scope_states()
        if not reps:
            return torch.full((4,), math.nan)
        betas = torch.stack([s[BETA].float() for s in reps])
        restarts = torch.stack([s[RESTARTS].float() for s in reps]).sum()
        return torch.stack([betas.mean(), betas.min(), betas.max(), restarts])

    def beta_stats(self) -> Dict[str, float]:
        """The latest step's ``beta`` over scopes as Python numbers (synchronises).

        Keys: ``beta`` (mean over scopes), ``beta_min``, ``beta_max``, ``restarts``
        (total momentum restarts so far, summed over scopes).
        """
        self.check_layout()
        mean, lo, hi, restarts = self.beta_summary_tensor().tolist()
        return {"beta": mean, "beta_min": lo, "beta_max": hi, "restarts": restarts}

    @property
    def beta(self) -> float:
        """The latest step's ``beta`` (mean over scopes for ``scope='tensor'``/``'group'``); synchronises."""
        return self.beta_stats()["beta"]

    def betas_per_scope(self) -> torch.Tensor:
        """1-D tensor of the latest step's ``beta`` of every scope (no host sync)."""
        reps = self._scope_states()
        return torch.stack([s[BETA] for s in reps]) if reps else torch.empty(0)

    # ------------------------------------------------------------- checkpoints
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Like torch's, but AM scalar state keeps its accumulation dtype.

        ``torch.optim.Optimizer`` casts every floating state tensor to the
        parameter's dtype; the products and betas must stay float32/64 so that a
        resumed bf16 run continues bit for bit.
        """
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        current = list(chain.from_iterable(g["params"] for g in self.param_groups))
        for pid, p in zip(saved_ids, current):
            saved = saved_state.get(pid)
            if not saved:
                continue
            device = local_view(p).device
            for key, value in saved.items():
                if isinstance(value, torch.Tensor) and (key.startswith("am_") or key == "step"):
                    self.state[p][key] = value.detach().clone().to(device=device)
        self._verified_signatures.clear()
        self._load_count += 1
        self._scope_reps.clear()

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_verified_signatures", set())
        self.__dict__.setdefault("_load_count", 0)
        self.__dict__.setdefault("_layout_mismatch", None)
        self.__dict__.setdefault("_device_constants", {})
        self.__dict__.setdefault("_scope_reps", {})


def fused_kernels(lists):
    """``(module, None)`` when compiled kernels can step these parallel tensor lists, else ``(None, why)``."""
    device = next((t.device for lst in lists for t in lst), None)
    if device is None:
        return None, "no tensors"
    if device.type == "cpu":
        reason = cpu_kernels.unsupported_reason(lists)
        if reason is None and cpu_kernels.library() is None:
            reason = f"the CPU kernels are unavailable ({cpu_kernels.build_error()})"
        return (cpu_kernels, None) if reason is None else (None, reason)
    if device.type == "cuda":
        from . import _triton_kernels as triton_kernels  # imports Triton: only when CUDA tensors step

        reason = triton_kernels.unsupported_reason(lists)
        return (triton_kernels, None) if reason is None else (None, reason)
    return None, f"no fused kernels for {device.type} tensors"


def _positions_with_gradients(plans: List[GroupPlan], key) -> tuple:
    """Positions (among the call's params) of this rank's tensors that a key's collective sums."""
    return tuple(pos for plan in plans for pos, k in zip(plan.positions, plan.keys) if k == key)


def param_groups_per_tensor(params_or_groups) -> List[Dict[str, Any]]:
    """One param group per tensor, each keeping its original group's options.

    DeepSpeed ZeRO flattens each group into one partition; with one tensor per
    group every partition is a slice of one tensor, which makes
    ``scope='tensor'`` exact at every ZeRO stage (ALGORITHM.md section 6).
    """
    items = list(params_or_groups)
    if not items:
        return []
    groups = items if isinstance(items[0], dict) else [{"params": items}]
    out: List[Dict[str, Any]] = []
    for group in groups:
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        options = {k: v for k, v in group.items() if k != "params"}
        out.extend({"params": [p], **options} for p in params)
    return out
