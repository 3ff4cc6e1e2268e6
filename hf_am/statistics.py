"""What a step leaves for users to read: the reported coefficient per scope, restart counts (docs/algorithm.md §9).

:func:`record_step` stores each scope's reported coefficient and restart count
in its members' state; :class:`BetaStatistics` (a base of
:class:`hf_am.AMOptimizer`) reads them back.  Readers returning tensors never
synchronise with the device; those returning Python numbers do.
"""

from __future__ import annotations

import math
from itertools import chain, repeat
from typing import Any, Dict, Hashable, List, NamedTuple, Sequence

import torch

from .hyperparameters import has_restart_variant
from .planning import GroupPlan
from .state import APPLIED, BETA, FALLBACKS, PREV_LOSS, RESTARTS


class ScalarWrite(NamedTuple):
    """One-element state that phase 2 leaves for :func:`record_step` to store: ``values[i]`` goes to
    ``states[i][key]`` (AM-AdamW's step counts and products of coefficients, AM-SGD's step counts)."""

    states: List[Dict[str, Any]]
    key: str
    values: torch.Tensor  #: 1-D, one value per state


def record_step(optimizer, plans: List[GroupPlan], coefficients, device, loss, writes: Sequence[ScalarWrite] = ()):
    """Store each scope's reported and applied coefficients, restart and fallback counts and (exact mode)
    the loss in every member's state, and phase 2's ``writes``, for all groups of the step at once: one
    copy op over every per-tensor scalar of the step, where on CPU each foreach op over 0-d tensors
    dispatches once per tensor.  ``coefficients``: the step's :class:`~hf_am.coefficient.StepCoefficients`
    with the applied coefficient and restart flags the update used (on a rank disagreement: every momentum
    kept, no restart); the applied coefficient stored is the one the update multiplied the old momentum
    by, 0 after a restart.  Values are rounded to each destination's dtype once, as a copy or an in-place
    add into it would round them.  Returns the kernel set that stored the scalars, ``None`` where torch's
    ops did (or there was nothing to store)."""
    applied, restart = coefficients.applied, coefficients.restart
    by_plan = [list(map(optimizer.state.__getitem__, plan.params)) for plan in plans]
    states = list(chain.from_iterable(by_plan))
    if not states:  # a rank without gradients still ran the step's collective: nothing of its own to record
        return
    reps: Dict[Hashable, Dict[str, Any]] = optimizer._scope_reps
    for plan, plan_states in zip(plans, by_plan):
        if optimizer.scope == "tensor":  # one scope per tensor: (group, position) -> its state, in bulk
            reps.update(zip(zip(repeat(id(plan.group)), plan.positions), plan_states))
        else:
            reps["model" if optimizer.scope == "model" else id(plan.group)] = plan_states[0]
    idx = optimizer._device_constants.index([s for plan in plans for s in plan.scope_ids], device)
    # Without the Restart variant in any group the restart flags are zeros (a fact of the options, not
    # of the values: no host sync): the counts stay as they are, and the kept memory is `applied`.
    restarts_possible = any(has_restart_variant(plan.group) for plan in plans)
    memory = applied * (1.0 - restart) if restarts_possible else applied
    counted = (FALLBACKS, RESTARTS) if restarts_possible else (FALLBACKS,)
    increments = [coefficients.fallback, restart][: len(counted)]
    per_tensor = torch.stack([coefficients.reported, memory, *increments]).index_select(1, idx)  # float64
    keys = (BETA, APPLIED, *counted)
    destinations = [s[key] for key in keys for s in states] + [s[w.key] for w in writes for s in w.states]
    # The kernels that stepped every group store the scalars in one call (hf_am.kernels.cpu.store_scalars),
    # adding the counts' increments themselves; elsewhere, and where they decline the tensors, torch's ops.
    kernels = _scalar_kernels(plans, device)
    if kernels is None or not _store_with(kernels, destinations, per_tensor, writes):
        kernels = None
        # The counts as one vector each, added and written back with the copies: one copy op over all the
        # scalars is a fraction of a foreach add per count on CPU, where a foreach add of 0-d tensors
        # dispatches once per tensor.  Same bits: each count is the float64 sum rounded to its dtype.
        counts = torch.stack([s[key] for key in counted for s in states]).view(len(counted), -1) + per_tensor[2:]
        values = (per_tensor[:2].reshape(-1), counts.reshape(-1), *(w.values for w in writes))
        # The sources are views of a reused scratch: unbinding `values` anew would build one view per
        # destination every step (~90 us at 234 scalars on CPU, more than the copies themselves).  One
        # cat writes every value into it, widened to the counts' dtype (exactly) on the way.
        n_values = sum(v.numel() for v in values)
        if n_values != len(destinations):  # cat would resize the cached scratch
            raise RuntimeError(f"hf_am: {n_values} values for {len(destinations)} scalars")
        staging, sources = optimizer._device_constants.staging(len(destinations), counts.dtype, counts.device)
        torch.cat(values, out=staging)
        torch._foreach_copy_(destinations, sources)
    if optimizer.loss_estimate == "exact":
        value = torch.as_tensor(loss).detach()
        for s in states:
            s[PREV_LOSS] = value.to(device=s[BETA].device, dtype=s[BETA].dtype).clone()
    return kernels


def _store_with(kernels, destinations, per_tensor: torch.Tensor, writes: Sequence[ScalarWrite]) -> bool:
    """``kernels.store_scalars`` of the record: ``per_tensor``'s rows (reported, kept memory, then the
    counts' increments, added to the counts) and the writes' values, as one float64 vector."""
    values = torch.cat((per_tensor.reshape(-1), *(w.values for w in writes)))  # widened to float64, exactly
    n_set = 2 * per_tensor.shape[1]
    n_added = per_tensor.numel() - n_set
    adds = (0,) * n_set + (1,) * n_added + (0,) * (len(destinations) - n_set - n_added)
    return kernels.store_scalars(destinations, values, adds)


def _scalar_kernels(plans: List[GroupPlan], device):
    """The kernel set that stepped every group, where it stores one-element state
    (``store_scalars(destinations, values, adds) -> bool``: the C set); ``None``: torch's ops do."""
    kernels = plans[0].kernels if plans else None
    if device is None or device.type != "cpu" or any(plan.kernels is not kernels for plan in plans):
        return None
    return kernels if hasattr(kernels, "store_scalars") else None


class BetaStatistics:
    """Readers of the latest step's coefficient, shared by both optimizers."""

    def _scope_states(self) -> List[Dict[str, Any]]:
        """State of one representative parameter per scope, as of each scope's latest step.

        Kept by :func:`record_step` rather than read from ``param_groups``,
        because DeepSpeed ZeRO swaps the groups around ``step()`` calls.
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
        """``[mean, min, max, restarts, fallbacks, applied_mean, applied_min, applied_max]`` of the latest
        step over scopes (float64, on the device, without a host sync).

        ``mean/min/max`` are of the reported coefficient ``beta`` (§9), ``applied_*`` of the coefficient
        the update multiplied the old momentum by (``(beta + lam)/(1 + lam)``, 0 after a restart: how
        much memory is kept).  ``restarts`` is the total number of momentum restarts so far,
        ``fallbacks`` the total number of scope-steps whose sums were not finite (the coefficient fell
        back to ``beta_max``), both summed over scopes.  Accumulate this tensor between logging steps
        and read it once.
        """
        reps = self._scope_states()
        if not reps:
            return torch.full((8,), math.nan, dtype=torch.float64)
        # Called every step by the Trainer callback: one stack of every key (widened to the widest dtype,
        # exactly), one conversion to float64 and one reduction per kind, rather than ops per key or per
        # scope: on a GPU every op that computes is a launch and some microseconds of host time.
        keys = (BETA, APPLIED, RESTARTS, FALLBACKS)
        if all(APPLIED in s and FALLBACKS in s for s in reps):
            rows = torch.stack([s[key] for key in keys for s in reps]).view(len(keys), -1).double()
            coefficients, counts = rows[:2], rows[2:].sum(dim=1)  # [reported, applied]; [restarts, fallbacks]
            lows, highs = torch.aminmax(coefficients, dim=1)  # NaN propagates, as in min() and max()
            by_kind = torch.stack((coefficients.mean(dim=1), lows, highs), dim=1)  # (2, 3): mean, min, max
            return torch.cat((by_kind[0], counts, by_kind[1]))
        # state of hf_am 0.1 (no applied/fallback counts until the next step)
        betas = torch.stack([s[BETA].double() for s in reps])
        applied = torch.stack([s[APPLIED].double() if APPLIED in s else s[BETA].double() * math.nan for s in reps])
        restarts = torch.stack([s[RESTARTS].double() for s in reps])
        fallbacks = torch.stack([s[FALLBACKS].double() if FALLBACKS in s else s[RESTARTS].double() * 0 for s in reps])
        restarts, fallbacks = restarts.sum(), fallbacks.sum()
        return torch.stack(
            [betas.mean(), betas.min(), betas.max(), restarts, fallbacks, applied.mean(), applied.min(), applied.max()]
        )

    def beta_stats(self) -> Dict[str, float]:
        """The latest step's coefficients over scopes as Python numbers (synchronises).

        Keys: ``beta`` (mean over scopes of the reported coefficient), ``beta_min``, ``beta_max``,
        ``applied``, ``applied_min``, ``applied_max`` (the coefficient the update multiplied the old
        momentum by: how much memory is kept), ``restarts`` (total momentum restarts so far, summed
        over scopes) and ``fallbacks`` (scope-steps whose sums were not finite, so the coefficient
        stopped adapting).
        """
        self.check_layout()
        mean, lo, hi, restarts, fallbacks, a_mean, a_lo, a_hi = self.beta_summary_tensor().tolist()
        return {
            "beta": mean, "beta_min": lo, "beta_max": hi, "restarts": restarts, "fallbacks": fallbacks,
            "applied": a_mean, "applied_min": a_lo, "applied_max": a_hi,
        }  # fmt: skip

    @property
    def beta(self) -> float:
        """The latest step's ``beta`` (mean over scopes for ``scope='tensor'``/``'group'``); synchronises."""
        return self.beta_stats()["beta"]

    def betas_per_scope(self) -> torch.Tensor:
        """1-D tensor of the latest step's ``beta`` of every scope (no host sync)."""
        reps = self._scope_states()
        return torch.stack([s[BETA] for s in reps]) if reps else torch.empty(0)
