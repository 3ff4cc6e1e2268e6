"""AM-SGD (the paper's AM-MGD): heavy-ball momentum with an adaptive coefficient (docs/algorithm.md §5).

The class holds what is SGD-specific: its rules, its state and the dispatch of
both phases to the path :func:`hf_am.planning.choose_path` picked.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from . import multi_tensor, reference
from .hyperparameters import (
    FOREACH,
    FUSED,
    LAM,
    MAXIMIZE,
    LR,
    RESTART_THRESHOLD,
    WEIGHT_DECAY,
    Rule,
    beta_max_rule,
    beta_min_rule,
    refuse_unsupported,
)
from .optimizer import AMOptimizer
from .planning import GroupPlan, Path
from .sharding import local_view
from .state import APPLIED, BETA, FALLBACKS, RESTARTS, new_scalar_state
from .statistics import ScalarWrite

__all__ = ["AMSGD"]

_RULES: Sequence[Rule] = (
    LR,
    WEIGHT_DECAY,
    LAM,
    beta_max_rule("momentum", lambda g: g["momentum"]),
    beta_min_rule(lambda g: g["momentum"]),
    FOREACH,
    FUSED,
    MAXIMIZE,
    RESTART_THRESHOLD,
)


class AMSGD(AMOptimizer):
    r"""SGD with Adaptive Memory momentum.

    ``momentum`` is ``beta_max``.  The buffer follows ``d <- beta_eff*d + (1-beta_eff)*g``
    (``torch.optim.SGD`` with ``dampening=momentum`` when the coefficient is pinned:
    ``lam=0, beta_min=momentum``); the first step sets ``d <- g``.  Weight decay is
    coupled (added to the gradient), as in ``torch.optim.SGD``.

    Args are those of :class:`hf_am.AMAdamW` without ``betas``/``eps``; the default
    ``scope`` is ``"model"`` (one coefficient for the whole model, as in the paper).
    ``maximize`` works as in torch; ``nesterov``, ``dampening`` (other than ``None`` or
    ``momentum``), ``capturable`` and ``differentiable`` are refused with the reason.
    """

    beta_max_key = "momentum"

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        lam: float = 0.1,
        beta_min: float = 0.0,
        restart_threshold: Optional[float] = None,
        scope: str = "model",
        loss_estimate: str = "linear",
        process_group=None,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        maximize: bool = False,
        nesterov: bool = False,
        dampening: Optional[float] = None,
        capturable: bool = False,
        differentiable: bool = False,
    ):
        refuse_unsupported(
            type(self).__name__,
            dict(nesterov=nesterov, dampening=None if dampening == momentum else dampening, capturable=capturable, differentiable=differentiable),
        )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            lam=lam,
            beta_min=beta_min,
            restart_threshold=restart_threshold,
            foreach=foreach,
            fused=fused,
            maximize=maximize,
        )
        super().__init__(params, defaults, scope=scope, loss_estimate=loss_estimate, process_group=process_group)

    #: the one-element state every stepped parameter has (checked by the gate)
    required_scalar_state = ("step", BETA, RESTARTS, FALLBACKS, APPLIED)
    #: the per-element state tensors (checked by the gate, handed to the kernels)
    state_tensor_names = ("momentum_buffer",)

    @classmethod
    def group_rules(cls) -> Sequence[Rule]:
        return _RULES

    def _init_state(self, plans: List[GroupPlan]) -> None:
        for plan in plans:
            for p, lp in zip(plan.params, plan.local_params):
                state = self.state[p]
                if len(state) == 0:
                    new_scalar_state(state, lp)  # the buffer itself is created by the first update

    def _partial_sums(self, plan: GroupPlan) -> torch.Tensor:
        """Phase 1 reads only; the step count and the buffer change in phase 2."""
        states = [self.state[p] for p in plan.params]
        buffers = [local_view(s["momentum_buffer"]) if "momentum_buffer" in s else None for s in states]
        wd = plan.group["weight_decay"]
        if plan.path is Path.REFERENCE or any(b is None for b in buffers):
            # Reference path (also the first step, whose d = 0 needs no fast path).
            grads = reference.decayed_gradients(plan.local_grads, plan.local_params, wd)
            plan.scratch = (Path.REFERENCE, grads)
            return reference.sgd_sums(grads, buffers)
        if plan.path is Path.FUSED:
            plan.scratch = (Path.FUSED, None)
            sums = plan.kernels.sgd_sums(plan.local_grads, plan.local_params, buffers, wd)
            return sums.double()
        sums, kept = multi_tensor.sgd_sums(plan.local_grads, plan.local_params, buffers, wd)
        plan.scratch = (Path.MULTI_TENSOR, kept)
        return sums

    def _apply_update(self, plan: GroupPlan, applied: torch.Tensor, restart: torch.Tensor) -> List[ScalarWrite]:
        states = [self.state[p] for p in plan.params]
        # A restart forgets the momentum: coefficient 0 gives d <- g.
        keep = applied * (1.0 - restart)
        lr = plan.group["lr"]
        path, kept = plan.scratch
        if path is Path.REFERENCE:
            reference.sgd_update(plan.params, plan.local_params, states, kept, keep, lr)
        elif path is Path.FUSED:
            buffers = [local_view(s["momentum_buffer"]) for s in states]
            step = -torch.as_tensor(lr, dtype=torch.float64)  # a CPU scalar (or lr's own tensor)
            plan.kernels.sgd_update(plan.local_params, plan.local_grads, buffers, plan.group["weight_decay"], 1.0 - keep, step)
        else:
            buffers = [local_view(s["momentum_buffer"]) for s in states]
            multi_tensor.sgd_update(plan.local_params, plan.local_grads, buffers, kept, keep, lr, plan.group["weight_decay"])
        plan.scratch = None
        return [ScalarWrite(states, "step", torch.stack([s["step"] for s in states]) + 1.0)]
