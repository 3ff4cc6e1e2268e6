"""The one place where the adaptive momentum coefficient is computed.

Both optimizers reduce their gradients and momenta to three numbers per scope
(ALGORITHM.md section 2) and hand them to :func:`adaptive_beta`; nothing else in
the package evaluates the closed form.
"""

from __future__ import annotations

from typing import Optional, Union

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
    every scope of a step.  Returns ``beta = clip(1 - alpha, beta_min, beta_max)``;
    the caller turns it into the effective coefficient with
    :func:`effective_momentum`.  Pure tensor arithmetic: no host synchronisation.
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


def _is_number(*values) -> bool:
    return all(isinstance(v, (int, float)) for v in values)
