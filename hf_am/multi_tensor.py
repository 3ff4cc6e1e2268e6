"""The multi-tensor path of both optimizers: ``torch._foreach_*`` ops, tile by tile on CPU.

Runs where no compiled kernel set accepts the tensors (no C compiler, other
devices, ``fused=False``).  On CPU the passes run over cache-sized tiles
(:mod:`hf_am.kernels.tiling`) so their temporaries stay in cache; elsewhere one
tile holds every tensor and reductions use multi-tensor norms.  Equal to
:mod:`hf_am.reference` up to float rounding (tested).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch

from .kernels.tiling import TilePlan
from .reference import decayed_gradients


# ----------------------------------------------------------------- AM-AdamW (§6)
# The fast paths (compiled kernels, and this one) work with D' = sqrt(v) + eps * c = c * D,
# where c = sqrt(1 - beta2^t) is a per-tensor scalar: sum(x^2 / D) = c * sum(x^2 / D'), and
# the update p -= lr * m / (1 - prod) / D is p += s * m / D' with s = -lr * c / (1 - prod).
# That saves a pass in each phase and makes lr == 0 a plain zero step size (docs/algorithm.md §10).
def adamw_bias_terms(steps: torch.Tensor, prods: torch.Tensor, eps, beta2, acc):
    """(c = sqrt(1 - beta2^t), scale of d = m / (1 - prod), eps * c), per tensor (``steps``, ``prods``: 1-D)."""
    bias2_sqrt = (1.0 - beta2 ** steps.to(acc)).sqrt()
    prod_t = prods.to(acc)
    # prod == 1 means there is no previous momentum yet (d = 0).
    # (reciprocal(): `1.0 / t` is reciprocal() and a multiply by 1.0; a scalar 0.0 needs no zeros tensor)
    d_scale = torch.where(prod_t < 1, (1.0 - prod_t).reciprocal(), 0.0)
    return bias2_sqrt, d_scale, eps * bias2_sqrt


class _Phase1(NamedTuple):
    """What phase 1 of the multi-tensor path leaves for phase 2."""

    tiles: TilePlan
    bias2_sqrt: torch.Tensor  # c = sqrt(1 - beta2^t) per tensor
    eps_scaled: List[torch.Tensor]  # eps * c per tensor (0-dim tensors)
    beta2: float
    whole: Optional[tuple]  # (D', v') of the only tile, when there is one


def _second_moment(exp_avg_sqs, grads, beta2) -> List[torch.Tensor]:
    """This step's ``v' = beta2 v + (1 - beta2) g^2`` as new tensors (``v`` is stored in phase 2)."""
    v_next = torch._foreach_mul(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(v_next, grads, grads, 1.0 - beta2)
    return v_next


def _second_moment_(exp_avg_sqs, grads, beta2) -> None:
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)


def _scaled_denominators(exp_avg_sqs, eps_scaled):
    """D' = sqrt(v) + eps * sqrt(1 - beta2^t), as new tensors."""
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denoms, eps_scaled)
    return denoms


def _dots_cpu(grads, exp_avgs, denoms, neg_scale) -> List[torch.Tensor]:
    """Per piece ``<m,m>, <g,m>, <g-d,g-d>`` in the metric 1/D' (CPU: dot products).

    A dot product reads two tiles once, cheaper than the square root and
    multiplications the norm formulation of :func:`_norms_device` needs.
    """
    m_over_d = torch._foreach_div(exp_avgs, denoms)
    diff = torch._foreach_addcmul(grads, exp_avgs, neg_scale)  # g - d, d = scale * m
    diff_over_d = torch._foreach_div(diff, denoms)
    out = []
    for m, g, md, df, dfd in zip(exp_avgs, grads, m_over_d, diff, diff_over_d):
        # x * (x / D') per element: finite where x^2 would overflow; reshape: any memory layout
        md = md.reshape(-1)
        out += (torch.dot(md, m.reshape(-1)), torch.dot(md, g.reshape(-1)), torch.dot(dfd.reshape(-1), df.reshape(-1)))
    return out


def _norms_device(grads, exp_avgs, denoms, neg_scale) -> torch.Tensor:
    """Per tensor ``[|m|^2, |g|^2, |g-d|^2]`` in the metric 1/D' (one multi-tensor norm call).

    With r = D'^{-1/2}: <a,b>_{1/D'} = <a r, b r>, and foreach norms are fused
    kernels on GPUs, whereas dot products would be one launch per tensor.
    """
    r = torch._foreach_rsqrt(denoms)
    g_r = torch._foreach_mul(grads, r)
    torch._foreach_mul_(r, exp_avgs)  # r now holds m * r
    diff = torch._foreach_addcmul(g_r, r, neg_scale)  # (g - d) r
    norms = torch.stack(torch._foreach_norm([*r, *g_r, *diff], 2, dtype=torch.float64))
    return norms.view(3, len(grads)).t() ** 2


def adamw_sums(params, grads, exp_avgs, exp_avg_sqs, steps, prods, beta2, eps):
    """Phase 1, reading only: per tensor sums (float64) and what phase 2 needs (``steps``: this step's count)."""
    acc = grads[0].dtype
    bias2_sqrt, d_scale, eps_scaled = adamw_bias_terms(steps, prods, eps, beta2, acc)
    eps_scaled = list(eps_scaled.unbind(0))
    neg_scale = list((-d_scale).unbind(0))
    tiles = TilePlan([params, grads, exp_avgs, exp_avg_sqs])
    parts, whole = [], None
    for tile in tiles:
        i0, k = tile[0][0], len(tile)
        g, m, v = tiles.views(grads, tile), tiles.views(exp_avgs, tile), tiles.views(exp_avg_sqs, tile)
        v_next = _second_moment(v, g, beta2)
        denoms = _scaled_denominators(v_next, eps_scaled[i0 : i0 + k])
        if tiles.cpu:
            parts += _dots_cpu(g, m, denoms, neg_scale[i0 : i0 + k])
        else:
            parts.append(_norms_device(g, m, denoms, neg_scale))
        if tiles.whole:
            whole = (denoms, v_next)
    d_scale64 = d_scale.double()
    if tiles.cpu:
        mm, gm, diff = tiles.per_tensor(torch.stack(parts).view(-1, 3).double()).unbind(1)
        s_dd, s_gd = d_scale64**2 * mm, d_scale64 * gm
    else:
        mm, gg, diff = parts[0].unbind(1)
        s_dd = d_scale64**2 * mm
        s_gd = 0.5 * (gg + s_dd - diff)
    sums = torch.stack((s_dd, s_gd, diff), dim=1) * bias2_sqrt.double().unsqueeze(1)
    return sums, _Phase1(tiles, bias2_sqrt, eps_scaled, beta2, whole)


def adamw_update(params, grads, exp_avgs, exp_avg_sqs, phase1, beta_eff, restart, prods_new, *, lr, weight_decay, has_restarts):
    """Phase 2: store ``v'``, update ``m`` and ``x`` tile by tile."""
    tiles = phase1.tiles
    acc = params[0].dtype
    weights = list((1.0 - beta_eff.to(acc)).unbind(0))
    keep = list((1.0 - restart.to(acc)).unbind(0))
    step_size = -lr * phase1.bias2_sqrt / (1.0 - prods_new.to(acc))  # lr == 0 gives 0, never NaN
    step_list = None if tiles.cpu else list(step_size.unbind(0))
    for tile in tiles:
        i0, k = tile[0][0], len(tile)
        p, g, m = tiles.views(params, tile), tiles.views(grads, tile), tiles.views(exp_avgs, tile)
        v = tiles.views(exp_avg_sqs, tile)
        if phase1.whole is not None:
            denoms, v_next = phase1.whole
            torch._foreach_copy_(v, v_next)
        else:  # recomputing v' and D' costs less than keeping them when the tile is in cache
            _second_moment_(v, g, beta2=phase1.beta2)
            denoms = _scaled_denominators(v, phase1.eps_scaled[i0 : i0 + k])
        if weight_decay != 0:
            torch._foreach_mul_(p, 1.0 - lr * weight_decay)
        if has_restarts:  # a restart forgets the momentum first
            torch._foreach_mul_(m, keep[i0 : i0 + k])
        torch._foreach_lerp_(m, g, weights[i0 : i0 + k])
        if tiles.cpu:  # step sizes as a CPU tensor of scalars: no extra pass
            torch._foreach_addcdiv_(p, m, denoms, step_size.narrow(0, i0, k))
        else:  # device: fold the step size into D' (D' / 0 = inf gives a zero step)
            torch._foreach_div_(denoms, step_list)
            torch._foreach_addcdiv_(p, m, denoms)


# ------------------------------------------------------------------- AM-SGD (§5)
def sgd_sums(grads, params, buffers, weight_decay):
    """Per tensor ``[<d,d>, <g',d>, <g'-d,g'-d>]`` in float64 (``d^2`` overflows float32 for ``|d| > 1.8e19``)."""
    tiles = TilePlan([grads, params, buffers])
    parts, kept = [], None
    for tile in tiles:
        g = decayed_gradients(tiles.views(grads, tile), tiles.views(params, tile), weight_decay)
        d = tiles.views(buffers, tile)
        diff = torch._foreach_sub(g, d)
        if tiles.cpu:  # dot products: no multi-tensor reduction but one read of each tile
            for dd, gg, df in zip(d, g, diff):
                dd, gg, df = (t.reshape(-1).to(torch.float64) for t in (dd, gg, df))
                parts += (torch.dot(dd, dd), torch.dot(gg, dd), torch.dot(df, df))
        else:  # one fused multi-tensor norm call: [d | g | diff]
            norms = torch.stack(torch._foreach_norm([*d, *g, *diff], 2, dtype=torch.float64)).view(3, len(d)).t() ** 2
            s_dd, s_gg, s_diff = norms.unbind(1)
            parts.append(torch.stack((s_dd, 0.5 * (s_gg + s_dd - s_diff), s_diff), dim=1))
        if tiles.whole:
            kept = g
    sums = tiles.per_tensor(torch.stack(parts).view(-1, 3)) if tiles.cpu else parts[0]
    return sums, (tiles, kept)


def sgd_update(params, grads, buffers, kept, coefficient, lr, weight_decay):
    tiles, decayed = kept
    keeps = list(coefficient.to(params[0].dtype).unbind(0))
    weights = list((1.0 - coefficient.to(params[0].dtype)).unbind(0))
    for tile in tiles:
        i0, k = tile[0][0], len(tile)
        p, d = tiles.views(params, tile), tiles.views(buffers, tile)
        # The decayed gradient uses x before this step's update, so it is rebuilt first.
        g = decayed if decayed is not None else decayed_gradients(tiles.views(grads, tile), p, weight_decay)
        # d <- c d + (1 - c) g', as torch's SGD: a lerp's g' - d overflows where both are near the float max
        torch._foreach_mul_(d, keeps[i0 : i0 + k])
        torch._foreach_add_(d, torch._foreach_mul(g, weights[i0 : i0 + k]))
        if isinstance(lr, torch.Tensor):
            torch._foreach_add_(p, torch._foreach_mul(d, -lr))
        else:
            torch._foreach_add_(p, d, alpha=-lr)
