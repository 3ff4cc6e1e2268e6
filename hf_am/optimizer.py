"""The base class of AM-AdamW and AM-SGD: the sequence of a step, and nothing else.

A step (docs/algorithm.md §10) is

    plan -> sums -> reduce -> coefficient -> update -> record

* plan: :func:`hf_am.planning.plan_step` (what steps where, on which path; mutates nothing);
* sums: the optimizer's phase 1, per tensor ``[<d,d>, <g,d>, <g-d,g-d>]``;
* reduce: :func:`hf_am.reduction.scope_sums` (learning-rate weighting, the one collective);
* coefficient: :func:`hf_am.coefficient.step_coefficients` (the closed form, the restart rule);
* update: the optimizer's phase 2 with the applied coefficient;
* record: :func:`hf_am.statistics.record_step`.

Everything between the phases is tensor arithmetic, so ``step()`` never waits
for the device.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from .coefficient import step_coefficients
from .device_constants import DeviceConstants
from .hyperparameters import Hyperparameters, Rule, validate_group, validate_scope
from .planning import GroupPlan, Layout, plan_step
from .reduction import LayoutGuard, scope_sums
from .sharding import optional_numel
from .state import (
    INIT_NUMEL,
    INIT_TENSORS,
    PREV_LOSS,
    PREV_LR,
    check_state_format,
    mark_state_format,
    restore_scalar_state,
)
from .statistics import BetaStatistics, record_step


class AMOptimizer(BetaStatistics, torch.optim.Optimizer):
    """Base class: the step's sequence; subclasses provide the rules, the state and both phases."""

    #: param-group key holding ``beta_max``
    beta_max_key: str = ""

    def __init__(self, params, defaults: Dict[str, Any], *, scope: str, loss_estimate: str, process_group=None):
        validate_scope(scope, loss_estimate)
        self.scope = scope
        self.loss_estimate = loss_estimate
        self.process_group = process_group
        self._init_runtime()
        super().__init__(params, defaults)

    def _init_runtime(self) -> None:
        """What ``__init__`` sets besides the param groups (also restored by ``__setstate__``)."""
        self._guard = LayoutGuard(self.scope)
        self._load_count = 0  # part of the layout signature: a resumed run checks its layout again
        self._device_constants = DeviceConstants()
        self._scope_reps: Dict[Any, Dict[str, Any]] = {}

    # ------------------------------------------------------------------ groups
    @classmethod
    def group_rules(cls) -> Sequence[Rule]:
        """The checks of a param group, in order (:mod:`hf_am.hyperparameters`)."""
        raise NotImplementedError

    @classmethod
    def validate_group_options(cls, group: Dict[str, Any]) -> None:
        """Check a param group's options (``ValueError``/``TypeError`` naming the value and what is allowed).

        A classmethod so that ``--optim_args`` checks values with exactly these rules.
        """
        validate_group(group, cls.group_rules(), cls.beta_max_of(group))

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self.validate_group_options(group)
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

    @classmethod
    def beta_max_of(cls, group: Dict[str, Any]) -> float:
        value = group[cls.beta_max_key]
        return value[0] if cls.beta_max_key == "betas" else value

    def hyperparameters_of(self, group: Dict[str, Any]) -> Hyperparameters:
        return Hyperparameters(group["lam"], group["beta_min"], self.beta_max_of(group), group["restart_threshold"])

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; ``closure`` (re)computes the loss and gradients.

        With ``loss_estimate="exact"`` the loss the closure returns replaces the
        first-order estimate of ``f(x_t) - f(x_{t-1})`` (docs/algorithm.md §3).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.loss_estimate == "exact" and loss is None:
            raise ValueError(
                "loss_estimate='exact' needs the loss: call step(closure) with a closure that returns it"
            )
        plans, layout = plan_step(self)
        if not plans and not layout.groups_for_key:
            return loss
        self._guard.check_new_layout(plans, layout)
        self._init_state(plans)

        partials = [self._partial_sums(plan) for plan in plans]
        loss_delta = self._loss_delta(plans, loss, layout)
        sums, mismatch = scope_sums(plans, partials, layout, loss_delta is not None, self._device_constants)
        if mismatch is not None:
            self._guard.on_mismatch(mismatch, plans)

        hyper = self._scope_hyperparameters(layout)
        coefficients = step_coefficients(sums, *hyper, loss_delta)
        applied, restart = coefficients.applied, coefficients.restart
        if mismatch is not None and layout.device.type != "cpu":
            # Ranks disagreed (see LayoutGuard.on_mismatch): keep every momentum as it is.
            applied = torch.where(mismatch, torch.ones_like(applied), applied)
            restart = torch.where(mismatch, torch.zeros_like(restart), restart)

        for plan in plans:
            idx = self._device_constants.index(plan.scope_ids, layout.device)
            self._apply_update(plan, applied.index_select(0, idx), restart.index_select(0, idx))
            record_step(self, plan, coefficients.reported.index_select(0, idx), restart.index_select(0, idx), loss)
            lr = plan.group["lr"]  # a tensor lr is updated in place by schedulers: keep a copy
            plan.group[PREV_LR] = lr.detach().clone() if isinstance(lr, torch.Tensor) else lr
        return loss

    def _scope_hyperparameters(self, layout: Layout) -> Hyperparameters:
        """Python floats when every scope agrees, else per-scope tensors on the device."""
        values = set(layout.hyper_of_scope)
        if len(values) == 1:
            lam, bmin, bmax, thr = next(iter(values))
            return Hyperparameters(float(lam), float(bmin), float(bmax), None if thr is None else float(thr))
        thresholds = {h.restart_threshold is None for h in values}
        if len(thresholds) != 1:
            raise ValueError("restart_threshold must be set for all parameter groups or for none")
        columns = []
        for j in range(4):
            if j == 3 and next(iter(thresholds)):
                columns.append(None)
                continue
            key = ("hyper", j, layout.device, layout.acc, tuple(float(h[j]) for h in layout.hyper_of_scope))
            columns.append(self._device_constants.get(key, lambda: torch.tensor(key[-1], dtype=layout.acc, device=layout.device)))
        return Hyperparameters(*columns)

    def _loss_delta(self, plans: List[GroupPlan], loss, layout: Layout) -> Optional[torch.Tensor]:
        if self.loss_estimate != "exact":
            return None
        states = [self.state[p] for plan in plans for p in plan.params]
        if not states or not all(PREV_LOSS in s for s in states):
            return None  # first step: the linear estimate
        prev = states[0][PREV_LOSS]
        current = torch.as_tensor(loss).detach().to(device=layout.device, dtype=layout.acc)
        return current - prev.to(layout.acc)

    # ------------------------------------------------- subclass responsibilities
    def _init_state(self, plans: List[GroupPlan]) -> None:
        raise NotImplementedError

    def _partial_sums(self, plan: GroupPlan) -> torch.Tensor:
        """Phase 1: ``(n_tensors, 3)`` tensor of ``[<d,d>, <g,d>, <g-d,g-d>]`` per tensor (unweighted by lr)."""
        raise NotImplementedError

    def _apply_update(self, plan: GroupPlan, applied: torch.Tensor, restart: torch.Tensor) -> None:
        """Phase 2: the update with the applied coefficient (and restart flags) of each tensor's scope."""
        raise NotImplementedError

    # ------------------------------------------------------ rank agreement
    def check_layout(self) -> None:
        """Raise if an earlier device step found ranks disagreeing on which parameters have gradients (syncs)."""
        self._guard.check()

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """torch's state dict, each param group marked with the AM state format (docs/algorithm.md §11)."""
        return mark_state_format(super().state_dict())

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Like torch's, but AM scalar state keeps its accumulation dtype, and newer formats are refused."""
        check_state_format(state_dict, type(self).__name__)
        super().load_state_dict(state_dict)
        restore_scalar_state(self, state_dict)
        self._guard.forget()
        self._load_count += 1
        self._scope_reps.clear()

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_guard" not in self.__dict__:
            self._init_runtime()


def param_groups_per_tensor(params_or_groups) -> List[Dict[str, Any]]:
    """One param group per tensor, each keeping its original group's options.

    DeepSpeed ZeRO flattens each group into one partition; with one tensor per
    group every partition is a slice of one tensor, which makes
    ``scope='tensor'`` exact at every ZeRO stage (docs/algorithm.md §8).
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
