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
for the device.  Where nothing between the phases needs Python (one scope per tensor, no
collective, the C kernels: :meth:`AMOptimizer._whole_step_in_one_call`), sums, coefficient and
update are one kernel call with the same bits.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .coefficient import StepCoefficients, step_coefficients
from .device_constants import DeviceConstants
from .hyperparameters import (
    Hyperparameters,
    Rule,
    has_restart_variant,
    revalidate_changed_options,
    validate_group,
    validate_scope,
)
from .planning import GroupPlan, Layout, choose_path, state_lists, plan_step
from .reduction import LayoutGuard, scope_sums
from .sharding import local_view, optional_numel
from .state import (
    INIT_NUMEL,
    INIT_TENSORS,
    PREV_LOSS,
    PREV_LR,
    adopt_foreign_state,
    check_saved_options,
    check_state_fits,
    check_state_format,
    mark_state_format,
    restore_scalar_state,
)
from .statistics import BetaStatistics, ScalarWrite, record_step

logger = logging.getLogger("hf_am")


def remember_lr(group: Dict[str, Any]) -> None:
    """Keep this step's lr as the next step's previous lr (docs/algorithm.md §3).

    A tensor lr is updated in place by schedulers, so a copy is kept; after the first step the copy
    is refreshed in place, so that a step captured in a CUDA graph reads and writes the same buffer
    on every replay (a new tensor would leave the graph reading the lr of the step before capture).
    """
    lr = group["lr"]
    if not isinstance(lr, torch.Tensor):
        group[PREV_LR] = lr
        return
    prev = group.get(PREV_LR)
    if (isinstance(prev, torch.Tensor) and prev is not lr and prev.device == lr.device and prev.dtype == lr.dtype
            and prev.shape == lr.shape and not prev.requires_grad):
        prev.copy_(lr.detach())
    else:
        group[PREV_LR] = lr.detach().clone()


class AMOptimizer(BetaStatistics, torch.optim.Optimizer):
    """Base class: the step's sequence; subclasses provide the rules, the state and both phases."""

    #: param-group key holding ``beta_max``
    beta_max_key: str = ""
    #: the per-element state tensors of a parameter (checked by hf_am.gate, handed to the kernels)
    state_tensor_names: Sequence[str] = ()
    #: the one-element state every stepped parameter has (checked by hf_am.gate)
    required_scalar_state: Sequence[str] = ()

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
        self._prev_loss_placeholder = False  # see step(): am_prev_loss of a state-initialising step
        self._gate_accepted: Dict[int, tuple] = {}  # hf_am.gate: the one-element state it accepted, per group

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
        if self.scope == "model" and len(self.param_groups) > 1:
            first, this = self.hyperparameters_of(self.param_groups[0]), self.hyperparameters_of(group)
            if this != first:
                self.param_groups.pop()
                raise ValueError(
                    f"scope='model' computes one coefficient for all parameter groups, but param group "
                    f"{len(self.param_groups)} has {dict(this._asdict())} and param group 0 {dict(first._asdict())}. "
                    "Give every group the same lam, beta_min, beta_max and restart_threshold, or use "
                    "scope='group'/'tensor', where each group keeps its own"
                )
        self._warn_if_memory_is_kept_anyway(group)
        # Remember the group's shape before anybody (DeepSpeed) flattens it, so a
        # scope that a wrapper splits across step() calls can be detected.
        group.setdefault(INIT_TENSORS, len(group["params"]))
        group.setdefault(INIT_NUMEL, sum(optional_numel(p) for p in group["params"]))
        self._init_num_groups = len(self.param_groups)

    def _warn_if_memory_is_kept_anyway(self, group: Dict[str, Any]) -> None:
        """``beta_max = 0`` reads as "no momentum", but with ``lam > 0`` the update still keeps
        ``lam/(1+lam)`` of it (docs/algorithm.md §2): say so, once per optimizer."""
        lam, beta_max = group["lam"], self.beta_max_of(group)
        if beta_max == 0 and lam > 0 and not self.__dict__.get("_warned_memory"):
            self._warned_memory = True
            name = "betas[0]" if self.beta_max_key == "betas" else self.beta_max_key
            warnings.warn(
                f"{type(self).__name__}: {name}=0 with lam={lam} still keeps lam/(1+lam) = {lam / (1 + lam):.4g} of the "
                "momentum in every update (beta_max bounds beta, not the applied coefficient (beta + lam)/(1 + lam)); "
                "pass lam=0 for no momentum",
                UserWarning,
                stacklevel=4,
            )

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
        initialising = False
        if self.loss_estimate == "exact" and loss is None:
            initialising = self._is_state_initialising_step()
            if not initialising:
                raise ValueError(
                    "loss_estimate='exact' needs the loss: call step(closure) with a closure that returns it"
                )
        revalidate_changed_options(self)
        plans, layout = plan_step(self)
        if not plans and not layout.groups_for_key:
            return loss
        self._log_paths(plans)
        # Everything that can refuse the step runs before anything changes (docs/algorithm.md §10);
        # plan_step has checked every tensor against its parameter (hf_am.gate).
        self._guard.check_new_layout(plans, layout)
        # Where the gate read per-element state of every parameter of a plan (plan.state_tensors), none of them
        # is new; the others are looked at one parameter at a time.
        fresh = [plan for plan in plans if not plan.state_tensors]
        new_state = [p for plan in fresh for p in plan.params if not self.state.get(p)]
        self._init_state(fresh)
        runs = self._phase_runs(plans)
        whole = self._whole_step_in_one_call(runs, layout)
        try:
            if whole is not None:  # sums, coefficients and update in one kernel call, which refuses before any write
                coefficients, writes = whole()
            else:
                partials = _rows_per_plan(plans, runs, [self._partial_sums(run) for run, _ in runs])  # phase 1 reads only
                loss_delta = self._loss_delta(plans, loss, layout)
                sums, mismatch = scope_sums(plans, partials, layout, loss_delta is not None, self._device_constants)
                if mismatch is not None:
                    self._guard.on_mismatch(mismatch, plans)
        except BaseException:
            for p in new_state:  # leave no trace of a step that did not happen
                self.state.pop(p, None)
            raise

        if whole is None:
            coefficients, writes = self._coefficients_and_update(plans, runs, layout, sums, mismatch, loss_delta)
        for plan in plans:
            remember_lr(plan.group)
        record_step(self, plans, coefficients, layout.device, torch.zeros(()) if initialising else loss, writes)
        # After a state-initialising step am_prev_loss is a placeholder (0): it gives the state its
        # keys (DCP loads only the keys the state already has), but no step may difference it.
        self._prev_loss_placeholder = initialising
        return loss

    def _is_state_initialising_step(self) -> bool:
        """A step that only creates the state: no state yet, every learning rate 0, every gradient 0.

        ``torch.distributed.checkpoint.state_dict.set_optimizer_state_dict`` (DCP resume, FSDP2)
        makes a fresh optimizer's state this way, ``step()`` without a closure, before loading
        over it; the first step of ``loss_estimate="exact"`` uses no loss difference anyway
        (docs/algorithm.md §3), so it may run without the loss.  Only reached on the error path.
        """
        if self.state:
            return False
        groups = self.param_groups
        if not all(float(g["lr"]) == 0.0 for g in groups):
            return False
        grads = [local_view(p.grad) for g in groups for p in g["params"] if p.grad is not None]
        return bool(grads) and not any(bool(g.any()) for g in grads)

    def _coefficients_and_update(self, plans: List[GroupPlan], runs, layout: Layout, sums: torch.Tensor,
                                 mismatch: Optional[torch.Tensor], loss_delta: Optional[torch.Tensor]):
        """The two-call step after phase 1: the coefficients, then phase 2 with the coefficient and restart
        flags the update applies (on a rank disagreement found on the device: every momentum kept, no
        restart).  Returns ``(StepCoefficients, writes)``, the coefficients as applied."""
        coefficients = self._step_coefficients(plans, sums, layout, loss_delta)
        if mismatch is not None and layout.device.type != "cpu":
            # Ranks disagreed (see LayoutGuard.on_mismatch): keep every momentum as it is.
            coefficients = coefficients._replace(
                applied=torch.where(mismatch, torch.ones_like(coefficients.applied), coefficients.applied),
                restart=torch.where(mismatch, torch.zeros_like(coefficients.restart), coefficients.restart),
            )
        writes: List[ScalarWrite] = []
        for run, _ in runs:
            idx = self._device_constants.index(run.scope_ids, layout.device)
            writes += self._apply_update(run, coefficients.applied.index_select(0, idx), coefficients.restart.index_select(0, idx))
        return coefficients, writes

    def _step_coefficients(self, plans: List[GroupPlan], sums: torch.Tensor, layout: Layout,
                           loss_delta: Optional[torch.Tensor]) -> StepCoefficients:
        """The one place that picks where the closed form runs (docs/algorithm.md §10).

        Where every group steps on the C kernels the sums are float64 on the CPU, and the kernel set's
        library evaluates the coefficients in one call with the same bits as
        :func:`hf_am.coefficient.step_coefficients`, the definition every other path runs (its ~25 torch
        ops on a few dozen numbers cost more host time per step than the C kernels' whole call at small
        models); tests/unit/test_coefficient_kernel.py holds the two to each other.
        """
        kernels = plans[0].kernels if plans else None
        formula = getattr(kernels, "step_coefficients", None)
        if formula is None or sums.device.type != "cpu" or any(plan.kernels is not kernels for plan in plans):
            return step_coefficients(sums, *self._scope_hyperparameters(layout), loss_delta)
        return StepCoefficients(*formula(sums, *self._packed_hyperparameters(layout), loss_delta))

    def _packed_hyperparameters(self, layout: Layout) -> Tuple[torch.Tensor, bool]:
        """The scopes' ``lam, beta_min, beta_max, restart threshold`` as the C kernels read them: a
        ``(4, 1)`` float64 CPU tensor when every scope agrees, else ``(4, n_scopes)`` (NaN: no Restart
        variant), cached; and whether any scope has the Restart variant."""
        values = set(layout.hyper_of_scope)
        rows = tuple(values) if len(values) == 1 else tuple(layout.hyper_of_scope)
        has_threshold = any(map(has_restart_variant, rows))
        packed = self._device_constants.get(("hyper_rows", rows), lambda: torch.tensor(_hyper_columns(rows), dtype=torch.float64))
        return packed, has_threshold

    def _scope_hyperparameters(self, layout: Layout) -> Hyperparameters:
        """Python floats when every scope agrees, else per-scope tensors on the device
        (a NaN threshold for scopes without the Restart variant)."""
        values = set(layout.hyper_of_scope)
        if len(values) == 1:
            lam, bmin, bmax, thr = next(iter(values))
            return Hyperparameters(float(lam), float(bmin), float(bmax), None if thr is None else float(thr))
        columns = []
        for j, column in enumerate(_hyper_columns(layout.hyper_of_scope)):
            if j == 3 and all(math.isnan(v) for v in column):
                columns.append(None)
                continue
            key = ("hyper", j, layout.device, layout.acc, column)
            columns.append(self._device_constants.get(key, lambda: torch.tensor(column, dtype=layout.acc, device=layout.device)))
        return Hyperparameters(*columns)

    def _loss_delta(self, plans: List[GroupPlan], loss, layout: Layout) -> Optional[torch.Tensor]:
        if self.loss_estimate != "exact" or self._prev_loss_placeholder:
            return None
        states = [self.state[p] for plan in plans for p in plan.params]
        if not states or not all(PREV_LOSS in s for s in states):
            return None  # first step: the linear estimate
        prev = states[0][PREV_LOSS]
        current = torch.as_tensor(loss).detach().to(device=layout.device, dtype=layout.acc)
        return current - prev.to(layout.acc)

    #: Whether a step may run as one kernel call where :meth:`_whole_step_in_one_call` allows it.  Set it to
    #: False on an optimizer to run the phases as separate calls instead (the tests compare the two).
    one_call_step: bool = True

    def _whole_step_in_one_call(self, runs, layout: Layout):
        """A callable that runs the whole step (sums, coefficients, update) in one kernel call and returns
        ``(StepCoefficients, writes)``, or ``None`` where the step needs Python between the phases.

        It may where nothing between the phases is a collective or needs the host: every tensor its own
        scope (``scope="tensor"``), the linear loss estimate (no loss to difference), no reduction key (no
        collective, so no rank check), and one run, whose kernels offer it (:meth:`_one_call`).  What it
        saves is the host work between the phases (docs/algorithm.md §10); the results are the bits of the
        separate calls (tests/unit/test_one_call_step.py).
        """
        if (not self.one_call_step or self.scope != "tensor" or self.loss_estimate != "linear"
                or layout.groups_for_key or len(runs) != 1):  # fmt: skip
            return None
        return self._one_call(*runs[0], layout)

    # ------------------------------------------------- subclass responsibilities
    def _one_call(self, run: GroupPlan, members: List[GroupPlan], layout: Layout):
        """See :meth:`_whole_step_in_one_call`: the subclass's one-call step of ``run``, or ``None``."""
        return None

    def _phase_runs(self, plans: List[GroupPlan]) -> List[Tuple[GroupPlan, List[GroupPlan]]]:
        """How the phases run the plans: ``(plan a phase runs, the groups' plans it covers)``.

        One run per plan here; a subclass may cover several plans with one run (AM-AdamW merges
        the C kernels' calls of groups that differ only in weight decay), whose phase 1 returns
        the rows of all of them, in order.
        """
        return [(plan, [plan]) for plan in plans]

    def _init_state(self, plans: List[GroupPlan]) -> None:
        """Create the state of the parameters of ``plans`` that have none (step() passes only the plans whose
        parameters may lack it)."""
        raise NotImplementedError

    def _partial_sums(self, plan: GroupPlan) -> torch.Tensor:
        """Phase 1: ``(n_tensors, 3)`` tensor of ``[<d,d>, <g,d>, <g-d,g-d>]`` per tensor (unweighted by lr)."""
        raise NotImplementedError

    def _apply_update(self, plan: GroupPlan, applied: torch.Tensor, restart: torch.Tensor) -> List[ScalarWrite]:
        """Phase 2: the update with the applied coefficient (and restart flags) of each tensor's scope.

        Returns the one-element state it changes (step counts, ...), which :func:`record_step` stores
        with the statistics in one op."""
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
        """Like torch's, and also:

        * a ``torch.optim.AdamW`` state dict loads into :class:`AMAdamW` (switching a running job to
          AM-AdamW; docs/algorithm.md §11): its moments and step counts continue, the AM scalars
          start as if AdamW's ``beta1`` had been applied so far, and the AM hyperparameters come
          from this optimizer's param groups (the checkpoint's have none);
        * state that does not fit the parameters (other shapes, missing tensors) and formats written
          by a newer hf_am are refused here, with a message, before anything is loaded;
        * the AM scalar state keeps its accumulation dtype (torch would cast it to the parameter's).
        """
        name = type(self).__name__
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            found = f"a dict with keys {sorted(map(str, state_dict))[:8]}" if isinstance(state_dict, dict) else type(state_dict).__name__
            raise TypeError(f"{name}.load_state_dict expects an optimizer state dict (keys 'state' and 'param_groups'), got {found}")
        check_state_format(state_dict, name)
        state_dict = adopt_foreign_state(self, state_dict)
        check_saved_options(self, state_dict)
        check_state_fits(self, state_dict)
        super().load_state_dict(state_dict)
        restore_scalar_state(self, state_dict)
        self._guard.forget()
        self._gate_accepted.clear()
        self._prev_loss_placeholder = False
        self._load_count += 1
        self._scope_reps.clear()

    # ------------------------------------------------------------------- copies
    #: attributes beyond torch's (defaults, state, param_groups) that a copy must keep
    _COPIED = ("scope", "loss_estimate", "process_group", "_init_num_groups", "_load_count", "_prev_loss_placeholder")

    def __getstate__(self) -> Dict[str, Any]:
        """torch keeps only defaults, state and param groups; a copy (``copy.deepcopy``, pickle)
        also needs the constructor's options, or it cannot step."""
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._COPIED if k in self.__dict__})
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        load_count = self.__dict__.get("_load_count", 0)
        placeholder = self.__dict__.get("_prev_loss_placeholder", False)
        if "scope" in self.__dict__:
            self._init_runtime()  # caches and rank checks start afresh in the copy
            self._load_count = load_count
            self._prev_loss_placeholder = placeholder

    # -------------------------------------------------------------------- paths
    def paths(self) -> List[Dict[str, Any]]:
        """Which implementation each param group takes now, and why (docs/algorithm.md §10).

        One entry per non-empty group: ``{"group": index, "path": Path, "why": text}``; ``why``
        says, for a fallback, why the compiled kernels declined (``path`` is ``None`` where the
        step would refuse, e.g. ``fused=True`` on tensors the kernels decline).  Decided from the parameters
        and existing state as :func:`hf_am.planning.choose_path` does at each step.
        """
        out = []
        for index, group in enumerate(self.param_groups):
            params = list(group["params"])
            if not params:
                continue
            local = [local_view(p) for p in params]
            grads = [local_view(p.grad) if p.grad is not None else lp for p, lp in zip(params, local)]
            try:
                path, _, why = choose_path(group, index, [local, grads, *state_lists(self, params)])
            except RuntimeError as exc:  # fused=True where the kernels decline: the step would raise this
                path, why = None, str(exc)
            out.append({"group": index, "path": path, "why": why})
        return out

    def _log_paths(self, plans: List[GroupPlan]) -> None:
        """Log which path each group takes, once per change (``logging.getLogger("hf_am")``)."""
        chosen = tuple((plan.group_index, plan.path, plan.why) for plan in plans)
        if chosen != self.__dict__.get("_logged_paths"):
            self._logged_paths = chosen
            for index, path, why in chosen:
                logger.info("%s: param group %d takes the %s path (%s)", type(self).__name__, index, path.value, why)


def _hyper_columns(hypers: Sequence[Hyperparameters]) -> List[Tuple[float, ...]]:
    """``lam``, ``beta_min``, ``beta_max`` and the restart threshold of each scope as four columns of
    floats (NaN: a scope without the Restart variant), for both places that put them in tensors."""
    return [tuple(math.nan if h[j] is None else float(h[j]) for h in hypers) for j in range(4)]


def _rows_per_plan(plans: List[GroupPlan], runs, sums_per_run: List[torch.Tensor]) -> List[torch.Tensor]:
    """Phase 1's ``(n_tensors, 3)`` rows of each plan, in plan order, from the rows of each run."""
    rows: Dict[int, torch.Tensor] = {}
    for (_, members), sums in zip(runs, sums_per_run):
        parts = [sums] if len(members) == 1 else sums.split([len(m.params) for m in members])
        rows.update((id(m), part) for m, part in zip(members, parts))
    return [rows[id(plan)] for plan in plans]


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
