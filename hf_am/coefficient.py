"""The math of the coefficient: closed form, restart rule, effective momentum (docs/algorithm.md §2, §7).

Both optimizers reduce their gradients and momenta to three numbers per scope
and hand them to :func:`step_coefficients`, the definition.  The C kernel set
repeats its double operations in the same order for sums on the CPU (one call
instead of ~25 torch ops; ``am_coefficients`` in hf_am/csrc/am_cpu_kernels.c),
tested bit for bit against it.  A step has three coefficients per scope, each with
one name everywhere (:class:`StepCoefficients`):

* ``adaptive``: ``beta = clip(1 - alpha, beta_min, beta_max)``, the closed form;
* ``reported``: what the statistics show (``adaptive``, or for the Restart
  variant ``beta_max``, and 0 on a restart step);
* ``applied``: ``(base + lam) / (1 + lam)``, the heavy-ball coefficient the
  momentum update multiplies the old momentum by.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

Number = Union[float, torch.Tensor]


def adaptive_beta(
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    lam: Number,
    beta_min: Number,
    beta_max: Number,
    loss_delta: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Closed-form momentum coefficient of the two-plane proximal model.

    ``A = sum_k eta_k <d,d>_k``, ``B = sum_k w_k <g,d>_k`` (``w_k = eta_k + eta'_k``
    for the first-order loss estimate, ``eta_k`` when the true loss difference
    ``loss_delta = f(x_t) - f(x_{t-1})`` is supplied) and
    ``C = sum_k eta_k <g-d,g-d>_k``.  All arguments broadcast, so one call serves
    every scope of a step.  Returns ``beta = clip(1 - alpha, beta_min, beta_max)``
    (§2); :func:`effective_momentum` turns it into the applied coefficient.
    Pure tensor arithmetic: no host synchronisation.
    """
    numerator = A - B
    if loss_delta is not None:
        numerator = numerator + loss_delta
    numerator = numerator * (1.0 + lam)
    positive_c = ~(C <= 0)  # NaN counts as positive, so a NaN sum gives a NaN beta, not a silent corner
    # C == 0 means g == d on the whole scope: alpha is 0 or 1 by the sign of the numerator.
    safe_c = torch.where(positive_c, C, torch.ones_like(C))
    alpha = torch.where(positive_c, numerator / safe_c, torch.where(numerator > 0, 1.0, 0.0).to(C.dtype))
    alpha = alpha.clamp(0.0, 1.0)
    beta = 1.0 - alpha
    # NaN sums (a non-finite gradient) leave beta NaN, like the update itself would be.
    return torch.clamp(beta, min=beta_min, max=beta_max) if _is_number(beta_min, beta_max) else torch.minimum(
        torch.maximum(beta, torch.as_tensor(beta_min, dtype=beta.dtype, device=beta.device)),
        torch.as_tensor(beta_max, dtype=beta.dtype, device=beta.device),
    )


def effective_momentum(beta: torch.Tensor, lam: Number) -> torch.Tensor:
    """``beta_eff = (beta + lam) / (1 + lam)``: the heavy-ball coefficient the step uses."""
    return (beta + lam) / (1.0 + lam)


class StepCoefficients(NamedTuple):
    """The coefficients of one step, one entry per scope (float64 tensors)."""

    adaptive: torch.Tensor  #: closed form, clipped to [beta_min, beta_max] (§2)
    reported: torch.Tensor  #: what beta statistics and logs show (§9)
    applied: torch.Tensor  #: multiplies the old momentum in the update (§1, §7)
    restart: torch.Tensor  #: 1.0 where the Restart variant resets the momentum this step, else 0.0
    fallback: torch.Tensor  #: 1.0 where the sums were not finite, so the coefficient is beta_max (§2)


def step_coefficients(
    sums: torch.Tensor,
    lam: Number,
    beta_min: Number,
    beta_max: Number,
    restart_threshold: Optional[Number],
    loss_delta: Optional[torch.Tensor] = None,
) -> StepCoefficients:
    """All coefficients of a step from the per-scope sums ``[A, B, C]`` (``sums`` is ``(n_scopes, 3)``).

    A scope whose sums are not finite (a NaN or inf gradient somewhere in it)
    takes ``beta_max`` and no restart this step, so tensors with finite
    gradients keep finite state; ``fallback`` marks it.  Without
    ``restart_threshold`` the adaptive coefficient is used.  The Restart variant
    (§7) keeps the momentum at ``beta_max`` and resets it first wherever the
    adaptive coefficient falls below the threshold; such a step keeps no memory,
    so it reports 0.  A per-scope threshold tensor may hold NaN for scopes without
    the variant.
    """
    finite = torch.isfinite(sums).all(dim=1)
    if loss_delta is not None:
        finite = finite & torch.isfinite(loss_delta)
    beta = adaptive_beta(sums[:, 0], sums[:, 1], sums[:, 2], lam, beta_min, beta_max, loss_delta)
    beta_max_t = torch.full_like(beta, beta_max) if isinstance(beta_max, float) else beta_max.to(beta.dtype)
    beta = torch.where(finite, beta, beta_max_t)
    fallback = (~finite).to(sums.dtype)
    if restart_threshold is None:
        restart = torch.zeros_like(beta)
        base = reported = beta
    else:
        restart = ((beta < restart_threshold) & finite).to(sums.dtype)  # a NaN threshold (no variant): never
        if isinstance(restart_threshold, torch.Tensor):
            base = torch.where(torch.isnan(restart_threshold), beta, beta_max_t)
        else:
            base = beta_max_t
        reported = base * (1.0 - restart)
    return StepCoefficients(beta, reported, effective_momentum(base, lam), restart, fallback)


def _is_number(*values) -> bool:
    return all(isinstance(v, (int, float)) for v in values)
