"""Worker: flat partitions with ``process_group=`` (the DeepSpeed ZeRO layout, built by hand).

Modes (``<mode>=<case>,<case>`` arguments, several per launch):

``flat``       every rank holds a contiguous piece of every tensor's flattened
               values (uneven pieces; rank 1 holds nothing of one tensor and
               rank 0 nothing of another), ``process_group=WORLD``; each case
               (``<adamw|sgd>:<scope>:<linear|exact>:<one|two>``)
               is trained for a few steps and compared, step by step, with the
               1-process run.
``replicated`` DDP-like replicas (every rank holds whole tensors and the
               averaged gradient), no ``process_group``; counts collectives
               (cases: ``linear``, ``exact`` loss estimate).
               ``replicated-reduce`` is the negative control: the same, but
               with ``process_group=WORLD``, i.e. a reduction over replicas.
``disagree``   the ranks hold different numbers of scopes; every rank must
               raise ``ValueError`` (the launcher's timeout turns a hang into a
               failure); cases ``tensor``, ``group``.
``late``       the same layout on both ranks, but from step 3 on rank 1 has no
               gradient for one of its (non-empty) pieces, for one step: every
               rank must raise ``RuntimeError`` in that step, after exactly one
               collective, with its parameters unchanged; the next step (both
               ranks with every gradient) must run normally; cases: scopes.
``late-cuda``  the same with the pieces on the GPU (gloo reduces CUDA tensors): the
               sums are not read inside step(), so the step keeps the momentum
               and ``check_layout()`` raises afterwards.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import dist_common as dc
from helpers import max_param_diff

STEPS = 5
# Where rank 0's piece of each tensor ends (numels 48, 8, 40, 5, 15): uneven
# everywhere, rank 1 holds nothing of tensor 1, rank 0 nothing of tensor 3.
CUTS = [30, 8, 13, 0, 7]


def piece_bounds(rank, numel, cut):
    return (0, cut) if rank == 0 else (cut, numel)


def run_flat(rank, name, scope, estimate, kind):
    model = dc.make_model()
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    bounds = [piece_bounds(rank, p.numel(), c) for p, c in zip(params, CUTS)]
    pieces = [torch.nn.Parameter(p.detach().flatten()[a:b].clone()) for p, (a, b) in zip(params, bounds)]
    piece_of = {id(p): q for p, q in zip(params, pieces)}
    groups = [dict(g, params=[piece_of[id(p)] for p in g["params"]]) for g in dc.grouping(kind, model.named_parameters())]
    opt = dc.make_optimizer(name, groups, scope, loss_estimate=estimate, process_group=dist.group.WORLD)

    params_hist, betas_hist, calls = [], [], []
    for x, y in dc.global_batches(STEPS, same=estimate == "exact"):
        def closure():
            # The full-batch gradient of the whole model, of which each piece takes its part.
            model.zero_grad()
            loss = dc.loss_fn(model, x, y)
            loss.backward()
            for i, (p, q, (a, b)) in enumerate(zip(params, pieces, bounds)):
                empty_without_grad = (b == a) and i == 1  # one empty piece has no gradient at all
                q.grad = None if empty_without_grad else p.grad.detach().flatten()[a:b].clone()
            return loss

        with dc.CollectiveCounter() as counter:
            opt.step(closure)
        calls.append(counter.calls)
        # Rebuild the whole tensors from the pieces (zeros elsewhere, so the sum is exact).
        for p, q, (a, b) in zip(params, pieces, bounds):
            full = torch.zeros(p.numel())
            full[a:b] = q.detach()
            dist.all_reduce(full)
            with torch.no_grad():
                p.copy_(full.view_as(p))
        params_hist.append([p.detach().clone() for p in params])
        betas_hist.append(opt.betas_per_scope().tolist())
        dc.decay_lr(opt)

    ref_params, ref_betas = dc.reference_run(name, scope, kind, STEPS, loss_estimate=estimate)
    return {
        "max_param_diff": max(max_param_diff(a, b) for a, b in zip(params_hist, ref_params)),
        "param_change": max(max_param_diff(a, b) for a, b in zip(ref_params[-1], dc.make_model().parameters())),
        "betas": betas_hist,
        "ref_betas": ref_betas,
        "calls": calls,
        "piece_numels": [b - a for a, b in bounds],
        "names": names,
    }


def run_replicated(rank, world, reduce_over_replicas, estimate):
    """DDP replicas: whole tensors on every rank, gradients averaged before the step."""
    model = dc.make_model()
    pg = dist.group.WORLD if reduce_over_replicas else None
    opt = dc.make_optimizer("sgd", dc.grouping("two", model.named_parameters()), "model",
                            loss_estimate=estimate, process_group=pg)
    params_hist, betas_hist, calls = [], [], []
    for x, y in dc.global_batches(STEPS, same=estimate == "exact"):
        half = slice(rank * len(x) // world, (rank + 1) * len(x) // world)

        def closure():
            opt.zero_grad()
            loss = dc.loss_fn(model, x[half], y[half])
            loss.backward()
            for p in model.parameters():  # what DDP does during backward
                dist.all_reduce(p.grad)
                p.grad /= world
            total = loss.detach().clone()
            dist.all_reduce(total)
            return total / world

        def counted_step():
            # The gradient all-reduce above belongs to DDP, not to the optimizer:
            # count only what step() itself runs after the closure returned.
            loss = closure()
            with dc.CollectiveCounter() as counter:
                opt.step(lambda: loss)
            return counter.calls

        calls.append(counted_step())
        params_hist.append([p.detach().clone() for p in model.parameters()])
        betas_hist.append(opt.betas_per_scope().tolist())
        dc.decay_lr(opt)
    ref_params, ref_betas = dc.reference_run("sgd", "model", "two", STEPS, loss_estimate=estimate)
    return {
        "max_param_diff": max(max_param_diff(a, b) for a, b in zip(params_hist, ref_params)),
        "betas": betas_hist,
        "ref_betas": ref_betas,
        "calls": calls,
    }


def run_disagree(rank, scope):
    """Rank 1 holds one tensor fewer (scope='tensor') or one group fewer (scope='group')."""
    model = dc.make_model()
    params = list(model.parameters())
    if scope == "tensor":
        mine = params if rank == 0 else params[:-1]
        groups = [{"params": [torch.nn.Parameter(p.detach().flatten().clone()) for p in mine]}]
    else:
        groups = [{"params": [torch.nn.Parameter(p.detach().flatten().clone())]} for p in params]
        groups = groups if rank == 0 else groups[:-1]
    opt = dc.make_optimizer("adamw", groups, scope, process_group=dist.group.WORLD)
    for g in opt.param_groups:
        for q in g["params"]:
            q.grad = torch.ones_like(q)
    try:
        opt.step()
    except ValueError as exc:
        return {"error": f"ValueError: {exc}"}
    return {"error": None}


def run_late_disagreement(rank, scope, device="cpu"):
    model = dc.make_model()
    params = list(model.parameters())
    bounds = [piece_bounds(rank, p.numel(), c) for p, c in zip(params, CUTS)]
    pieces = [torch.nn.Parameter(p.detach().flatten()[a:b].clone().to(device)) for p, (a, b) in zip(params, bounds)]
    opt = dc.make_optimizer("adamw", [{"params": pieces}], scope, process_group=dist.group.WORLD)
    record = {"errors": [], "calls": [], "unchanged": [], "moments_unchanged": []}
    for step, (x, y) in enumerate(dc.global_batches(4)):
        model.zero_grad()
        dc.loss_fn(model, x, y).backward()
        for i, (p, q, (a, b)) in enumerate(zip(params, pieces, bounds)):
            drop = step == 2 and rank == 1 and i == 0  # rank 1 alone loses a non-empty piece's gradient
            q.grad = None if drop else p.grad.detach().flatten()[a:b].clone().to(device)
        before = [q.detach().clone() for q in pieces]
        moments = [opt.state[q].get(k) for q in pieces for k in ("exp_avg", "exp_avg_sq")]
        moments_before = [None if t is None else t.clone() for t in moments]
        error = None
        with dc.CollectiveCounter() as counter:
            try:
                opt.step()
            except RuntimeError as exc:
                error = f"RuntimeError: {exc}"
        record["errors"].append(error)
        record["calls"].append(counter.calls)
        record["unchanged"].append(all(torch.equal(a, b) for a, b in zip(before, pieces)))
        record["moments_unchanged"].append(
            step > 0 and all(torch.equal(a, b) for a, b in zip(moments_before, moments) if b.numel())
        )
        try:
            opt.check_layout()
            record.setdefault("checked", []).append(None)
        except RuntimeError as exc:
            record.setdefault("checked", []).append(f"RuntimeError: {exc}")
    return record


def main():
    """argv[1:]: ``<mode>=<case>,<case>,...`` tokens, run in order in one launch (startup dominates)."""
    rank, world = dc.init()
    result = {}
    with dc.exit_on_error():
        for token in sys.argv[1:]:
            mode, _, cases = token.partition("=")
            out = result.setdefault(mode, {})
            for case in cases.split(","):
                if mode == "flat":
                    name, scope, estimate, kind = case.split(":")
                    out[case] = run_flat(rank, name, scope, estimate, kind)
                elif mode in ("replicated", "replicated-reduce"):
                    out[case] = run_replicated(rank, world, mode == "replicated-reduce", case)
                elif mode == "disagree":
                    out[case] = run_disagree(rank, case)
                elif mode in ("late", "late-cuda"):
                    out[case] = run_late_disagreement(rank, case, "cuda" if mode == "late-cuda" else "cpu")
                else:
                    raise SystemExit(f"unknown mode {mode}")
    dc.finish(result)


if __name__ == "__main__":
    main()
