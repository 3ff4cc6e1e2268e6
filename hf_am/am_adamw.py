"""AM-AdamW: AdamW whose first-moment coefficient is chosen every step (docs/algorithm.md §6).

The class holds what is AdamW-specific: its rules, its state and the dispatch
of both phases to the path :func:`hf_am.planning.choose_path` picked.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from . import multi_tensor, reference
from .coefficient import StepCoefficients
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
    has_restart_variant,
    refuse_unsupported,
    is_real,
)
from .optimizer import AMOptimizer
from .planning import GroupPlan, Path
from .sharding import local_view
from .state import APPLIED, BETA, FALLBACKS, PREV_LR, PROD, RESTARTS, accumulation_dtype, new_scalar_state
from .statistics import ScalarWrite

__all__ = ["AMAdamW"]

_RULES: Sequence[Rule] = (
    LR,
    WEIGHT_DECAY,
    LAM,
    beta_max_rule("betas[0]", lambda g: g["betas"][0]),
    beta_min_rule(lambda g: g["betas"][0]),
    FOREACH,
    FUSED,
    MAXIMIZE,
    RESTART_THRESHOLD,
    Rule("betas", "betas[1] (beta2)", "0 <= beta2 < 1", lambda v, g: is_real(v) and 0.0 <= v < 1.0, lambda g: g["betas"][1]),
    Rule("eps", "eps", "eps > 0", lambda v, g: is_real(v) and v > 0.0, lambda g: g["eps"]),
)


class AMAdamW(AMOptimizer):
    r"""AdamW with Adaptive Memory momentum.

    ``betas[0]`` is ``beta_max``, the most memory the adaptive coefficient may
    keep, so AdamW keyword arguments carry over.  Inner products of the beta
    formula use the Adam preconditioner ``D = sqrt(v_hat) + eps`` as metric.

    Args:
        params: parameters or param groups (per-group ``lr``, ``weight_decay``,
            ``betas``, ``eps``, ``lam``, ``beta_min``, ``restart_threshold``).
        lr, betas, eps, weight_decay: as in :class:`torch.optim.AdamW` (decoupled decay).
        lam: pull towards the previous direction (the paper's lambda); 0 keeps the raw
            coefficient, so ``lam=0, beta_min=beta_max=beta1`` is exactly AdamW.
        beta_min: lower clip of ``beta`` (the "Clip" variant when > 0).
        restart_threshold: ``None``, or the "Restart" variant: momentum fixed at
            ``beta_max`` and reset whenever the adaptive ``beta`` falls below it.
        scope: ``"tensor"`` (one ``beta`` per parameter tensor), ``"group"`` or ``"model"``.
        loss_estimate: ``"linear"`` (first-order estimate of the loss change) or
            ``"exact"`` (the loss returned by ``step(closure)``; needs ``scope="model"``).
        process_group: treat every parameter as this rank's shard of a tensor split
            over the group (DeepSpeed ZeRO, FSDP1); DTensor parameters need nothing.
        foreach: ``None``/``True``: the multi-tensor path; ``False``: the per-tensor reference path.
        fused: ``None`` (default): compiled kernels where they apply (plain C for
            contiguous float32/float64 CPU tensors, Triton for contiguous
            float32/bfloat16/float16 CUDA tensors), else ``foreach``; ``True``: insist
            on them; ``False``: never (:mod:`hf_am.kernels`).
        maximize: as in :class:`torch.optim.AdamW` (step along the gradient).
        amsgrad, capturable, differentiable: torch's options that AM-AdamW does not
            offer; set, they raise ``ValueError`` saying why.
    """

    beta_max_key = "betas"

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        lam: float = 0.1,
        beta_min: float = 0.0,
        restart_threshold: Optional[float] = None,
        scope: str = "tensor",
        loss_estimate: str = "linear",
        process_group=None,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        maximize: bool = False,
        amsgrad: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
    ):
        refuse_unsupported(type(self).__name__, dict(amsgrad=amsgrad, capturable=capturable, differentiable=differentiable))
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
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
    required_scalar_state = ("step", PROD, BETA, RESTARTS, FALLBACKS, APPLIED)
    #: the per-element state tensors (checked by the gate, handed to the kernels)
    state_tensor_names = ("exp_avg", "exp_avg_sq")

    @classmethod
    def group_rules(cls) -> Sequence[Rule]:
        return _RULES

    @classmethod
    def validate_group_options(cls, group) -> None:
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"Invalid betas: {betas!r} (allowed: a pair (beta_max, beta2))")
        group["betas"] = tuple(betas)
        super().validate_group_options(group)

    def _init_state(self, plans: List[GroupPlan]) -> None:
        for plan in plans:
            for p, lp in zip(plan.params, plan.local_params):
                state = self.state[p]
                if len(state) == 0:
                    new_scalar_state(state, lp)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state[PROD] = torch.ones((), dtype=accumulation_dtype(lp.dtype), device=lp.device)

    def _lists(self, plan: GroupPlan):
        """``(states, exp_avgs, exp_avg_sqs)`` of the plan's parameters (local views); the moments as the gate
        read them where it did (``plan.state_tensors``: every parameter had both before this step)."""
        states = list(map(self.state.__getitem__, plan.params))
        checked = plan.state_tensors
        if checked is not None and len(checked) == 2:
            return (states, *checked)
        return (
            states,
            [local_view(s["exp_avg"]) for s in states],
            [local_view(s["exp_avg_sq"]) for s in states],
        )

    def _phase_runs(self, plans: List[GroupPlan]) -> List[Tuple[GroupPlan, List[GroupPlan]]]:
        """One kernel call per phase for the groups that differ only in weight decay.

        The Trainer's two groups (decay on matrices, none on norms) share lr, betas and eps; each
        call costs tens of microseconds of host work on top of the per-group scalar arithmetic,
        which at small models is most of AM's extra time (on a GPU: a Triton launch per phase and
        ~25 torch ops, most of them launches, per group and step).  The kernels take the decay per tensor,
        and every other per-tensor value is computed elementwise as it would be per group, so the
        results are the same bits (tests/unit/test_merged_kernel_calls.py for the C set; the Triton
        set in Triton's interpreter, tests/battery/test_triton_interpreter.py).
        """
        runs: List[Tuple[GroupPlan, List[GroupPlan]]] = []
        merged: Dict[tuple, List[GroupPlan]] = {}
        for plan in plans:
            key = _merge_key(plan)
            if key is None:
                runs.append((plan, [plan]))
            elif key in merged:
                merged[key].append(plan)
            else:
                merged[key] = members = [plan]
                runs.append((plan, members))
        return [(run if len(members) == 1 else self._merged_plan(members), members) for run, members in runs]

    def _merged_plan(self, members: List[GroupPlan]) -> GroupPlan:
        """A plan over the members' tensors, with the weight decay as a float64 vector per tensor."""
        decays = tuple(m.group["weight_decay"] for m in members for _ in m.params)
        first = members[0]
        group = dict(first.group)  # lr, betas, eps and the Restart flag are the members' own (_merge_key)
        # on the parameters' device: the Triton update forms 1 - lr * wd there, with no transfer after the first step
        group["weight_decay"] = self._device_constants.vector(decays, first.local_params[0].device)
        complete = all(m.state_tensors is not None and len(m.state_tensors) == 2 for m in members)
        return GroupPlan(
            group=group,
            state_tensors=[[t for m in members for t in m.state_tensors[k]] for k in range(2)] if complete else None,
            params=[p for m in members for p in m.params],
            local_params=[p for m in members for p in m.local_params],
            local_grads=[g for m in members for g in m.local_grads],
            scope_ids=[i for m in members for i in m.scope_ids],
            path=Path.FUSED,
            kernels=first.kernels,
            group_index=first.group_index,
        )

    def _one_call(self, run: GroupPlan, members: List[GroupPlan], layout):
        """The whole step of ``run`` in one C call (:meth:`_whole_step`), where its kernels offer it and
        every learning rate, this step's and the last, is a number (a tensor lr is read per group)."""
        if run.path is not Path.FUSED or getattr(run.kernels, "adamw_step", None) is None:
            return None
        lrs = [(m.group["lr"], m.group.get(PREV_LR, m.group["lr"])) for m in members]
        if not all(type(lr) in (float, int) and type(prev) in (float, int) for lr, prev in lrs):
            return None
        return functools.partial(self._whole_step, run, members, lrs, layout)

    def _whole_step(self, run: GroupPlan, members: List[GroupPlan], lrs, layout):
        """``(StepCoefficients, writes)`` of a step run as one C call; the per-tensor scalars it is given
        are the ones :meth:`_partial_sums` and :func:`_update_fused` compute, from the same functions."""
        states, exp_avgs, exp_avg_sqs = self._lists(run)
        group = run.group
        beta2, eps, lr = group["betas"][1], group["eps"], group["lr"]
        acc = accumulation_dtype(run.local_params[0].dtype)
        steps, prods, bias2_sqrt, d_scale, eps_scaled = _step_scalars(run.kernels, states, beta2, eps, acc)
        eta, eta_b, decay = _per_tensor_columns(members, lrs, lr)
        hyper, has_threshold = self._packed_hyperparameters(layout)
        coefficients, prods_new, _ = run.kernels.adamw_step(
            run.local_params, run.local_grads, exp_avgs, exp_avg_sqs, beta2=beta2, eps_scaled=eps_scaled,
            d_scale=d_scale, bias2_sqrt=bias2_sqrt, prods=prods, eta=eta, eta_b=eta_b,
            decay=decay if decay is not None else _decay_factor(lr, group["weight_decay"]),
            neg_lr=float(-lr), has_restarts=has_restart_variant(group), scope_ids=run.scope_ids,
            n_scopes=layout.n_scopes, hyper=hyper, has_threshold=has_threshold,
        )  # fmt: skip
        writes = [ScalarWrite(states, PROD, prods_new), ScalarWrite(states, "step", steps)]
        return StepCoefficients(*coefficients.unbind(0)), writes

    def _partial_sums(self, plan: GroupPlan) -> torch.Tensor:
        """Phase 1 reads only (state changes in phase 2), so a step that raises before phase 2 changes nothing."""
        states, exp_avgs, exp_avg_sqs = self._lists(plan)
        beta2, eps = plan.group["betas"][1], plan.group["eps"]
        if plan.path is Path.FUSED:
            acc = accumulation_dtype(plan.local_grads[0].dtype)
            steps, prods, *terms = _step_scalars(plan.kernels, states, beta2, eps, acc)
            sums, scratch = _sums_fused(plan.kernels, plan.local_grads, exp_avgs, exp_avg_sqs, beta2, *terms)
        else:
            # Per-tensor scalars as vectors: one stack each instead of an op per tensor (on CPU a foreach
            # op on 0-d tensors dispatches once per tensor).  This step's count is stored in phase 2.
            steps, prods = _counts_and_products(states)
            if plan.path is Path.REFERENCE:
                sums, scratch = reference.adamw_sums(plan.local_grads, exp_avgs, exp_avg_sqs, steps, prods, beta2, eps)
            else:
                args = (plan.local_params, plan.local_grads, exp_avgs, exp_avg_sqs, steps, prods, beta2, eps)
                sums, scratch = multi_tensor.adamw_sums(*args)
        plan.scratch = (scratch, steps, prods, (states, exp_avgs, exp_avg_sqs))
        return sums

    def _apply_update(self, plan: GroupPlan, applied: torch.Tensor, restart: torch.Tensor) -> List[ScalarWrite]:
        # The lists and prods as phase 1 read them (phase 1 changes no state).
        scratch, steps, prods, (states, exp_avgs, exp_avg_sqs) = plan.scratch
        group = plan.group
        has_restarts = has_restart_variant(group)
        if has_restarts:  # a restart starts the product of coefficients afresh
            prods = torch.where(restart > 0, torch.ones_like(prods), prods)
        prods_new = prods * applied.to(prods.dtype)
        update = _UPDATES[plan.path]
        update(
            plan.local_params,
            plan.local_grads,
            exp_avgs,
            exp_avg_sqs,
            scratch,
            applied,
            restart,
            prods_new,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            has_restarts=has_restarts,
        )
        plan.scratch = None
        return [ScalarWrite(states, PROD, prods_new), ScalarWrite(states, "step", steps)]


def _counts_and_products(states) -> Tuple[torch.Tensor, torch.Tensor]:
    """This step's counts (stored in phase 2) and the products of coefficients so far, one vector each."""
    return torch.stack([s["step"] for s in states]) + 1.0, torch.stack([s[PROD] for s in states])


_STEP, _PROD = operator.itemgetter("step"), operator.itemgetter(PROD)


def _step_scalars(kernels, states, beta2: float, eps: float, acc: torch.dtype) -> Tuple[torch.Tensor, ...]:
    """``(counts, products, c, d_scale, eps')`` of a step on a compiled kernel set: what
    :func:`_counts_and_products` and :func:`hf_am.multi_tensor.adamw_bias_terms` give, in one library call
    where the set offers ``adamw_scalars`` and takes these state tensors (the C set, for plain one-element
    CPU tensors of ``acc``); else from those definitions."""
    scalars = getattr(kernels, "adamw_scalars", None)
    if scalars is not None:
        out = scalars(list(map(_STEP, states)), list(map(_PROD, states)), beta2, eps, acc)
        if out is not None:
            return tuple(out.unbind(0))
    steps, prods = _counts_and_products(states)
    return (steps, prods, *multi_tensor.adamw_bias_terms(steps, prods, eps, beta2, acc))


def _decay_factor(lr, weight_decay) -> torch.Tensor:
    """``1 - lr * weight_decay`` as a float64 CPU scalar (or per-tensor vector): no transfer."""
    return torch.as_tensor(1.0 - lr * weight_decay, dtype=torch.float64)


def _per_tensor_columns(members: List[GroupPlan], lrs, lr) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The one-call step's per-tensor float64 columns, built in one op from Python numbers (an lr scheduler
    writes a new lr every step, so they are new every step): ``eta`` and ``eta + eta'`` (scope_sums'
    weights of ``A``/``C`` and of ``B``, the linear estimate) from each member group's ``(lr, previous lr)``,
    and the decay factor ``1 - lr * weight_decay`` of :func:`_decay_factor`, the same double arithmetic
    (``None`` where a member's weight decay is not a Python number: that function then computes it)."""
    decays = [m.group["weight_decay"] for m in members]
    plain = all(type(wd) in (float, int) for wd in decays)
    columns = [float(lr_m) for m, (lr_m, _) in zip(members, lrs) for _ in m.params]
    columns += [float(lr_m + prev) for m, (lr_m, prev) in zip(members, lrs) for _ in m.params]
    if plain:
        columns += [1.0 - lr * wd for m, wd in zip(members, decays) for _ in m.params]
    rows = torch.tensor(columns, dtype=torch.float64).view(3 if plain else 2, -1).unbind(0)
    return rows[0], rows[1], rows[2] if plain else None


def _merge_key(plan: GroupPlan) -> Optional[tuple]:
    """What plans must share to run as one kernel call per phase (``None``: this plan runs alone)."""
    if plan.path is not Path.FUSED or plan.kernels is None or plan.kernels.NAME not in ("cpu", "triton"):
        return None
    group = plan.group
    lr = group["lr"]
    if type(lr) not in (float, int):  # a tensor lr (schedulers in place): per group, as before
        return None
    # One call walks all its tensors with one element type: the kernels checked each plan's tensors
    # (one dtype, one device per plan), so plans of other dtypes or devices must not share a call.
    first = plan.local_params[0]
    return (id(plan.kernels), first.dtype, first.device, float(lr), group["betas"][1], group["eps"],
            has_restart_variant(group))


# ---------------------------------------------------------------------------
# The compiled kernel sets (hf_am.kernels) take D' and the step size as per-tensor scalars.
# ---------------------------------------------------------------------------
class _FusedPhase1(NamedTuple):
    kernels: Any  # a hf_am.kernels.KernelSet
    bias2_sqrt: torch.Tensor
    eps_scaled: torch.Tensor
    beta2: float


def _sums_fused(kernels, grads, exp_avgs, exp_avg_sqs, beta2, bias2_sqrt, d_scale, eps_scaled):
    sums = kernels.adamw_sums(grads, exp_avgs, exp_avg_sqs, beta2, eps_scaled, d_scale)
    return sums.double() * bias2_sqrt.double().unsqueeze(1), _FusedPhase1(kernels, bias2_sqrt, eps_scaled, beta2)


def _update_fused(params, grads, exp_avgs, exp_avg_sqs, phase1, applied, restart, prods_new, *, lr, weight_decay, has_restarts):
    acc = accumulation_dtype(params[0].dtype)
    step_size = -lr * phase1.bias2_sqrt / (1.0 - prods_new.to(acc))
    decay = _decay_factor(lr, weight_decay)
    keep = (1.0 - restart) if has_restarts else None
    phase1.kernels.adamw_update(
        params, grads, exp_avgs, exp_avg_sqs, phase1.beta2, phase1.eps_scaled, keep, 1.0 - applied, decay, step_size
    )


_UPDATES = {Path.REFERENCE: reference.adamw_update, Path.MULTI_TENSOR: multi_tensor.adamw_update, Path.FUSED: _update_fused}
