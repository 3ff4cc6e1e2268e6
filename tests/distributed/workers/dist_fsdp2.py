"""Worker: DTensor parameters (FSDP2 ``fully_shard``; hand-placed Shard/Replicate DTensors).

Modes (arguments ``fsdp2=<case>,<case>`` and ``mixed``, several per launch):

``fsdp2``  cases ``<adamw|sgd>:<scope>``: a model whose last layer has
           one output row, so on 2 ranks that weight's local shard is ``(0, 5)`` on
           rank 1, and whose middle layer has 5 rows (uneven 3/2 shards), wrapped
           with ``fully_shard`` on a 1-D CPU mesh; each rank trains on its half of
           every global batch; compared step by step with the 1-process run.
``mixed``  ``scope="model"``: weights are ``Shard(0)`` DTensors, biases ``Replicate()``
           DTensors (as in tensor parallelism); the replicated ones must not be
           reduced.  Its negative control holds the same local values as plain
           tensors with ``process_group=WORLD``, so the biases are reduced over
           replicas, which must show up as a difference from the 1-process run.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import dist_common as dc
from helpers import max_param_diff

STEPS = 5
OUT = 1  # last layer (1, 5): rank 1's local shard is empty


def run_fsdp2(rank, world, name, scope, mesh):
    from torch.distributed.fsdp import fully_shard

    model = dc.make_model(out_features=OUT)
    kind = "two"
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    local_shapes = [tuple(p.to_local().shape) for p in model.parameters()]
    opt = dc.make_optimizer(name, dc.grouping(kind, model.named_parameters()), scope)

    params_hist, betas_hist, calls = [], [], []
    for x, y in dc.global_batches(STEPS, out_features=OUT):
        half = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        opt.zero_grad()
        loss = dc.loss_fn(model, x[half], y[half])  # FSDP2 averages the gradients over the ranks
        loss.backward()
        with dc.CollectiveCounter() as counter:
            opt.step()
        calls.append(counter.calls)
        params_hist.append([p.full_tensor().detach().clone() for p in model.parameters()])
        betas_hist.append(opt.betas_per_scope().tolist())
        dc.decay_lr(opt)

    ref_params, ref_betas = dc.reference_run(name, scope, kind, STEPS, out_features=OUT)
    return {
        "max_param_diff": max(max_param_diff(a, b) for a, b in zip(params_hist, ref_params)),
        "param_change": max(max_param_diff(a, b) for a, b in zip(ref_params[-1], dc.make_model(out_features=OUT).parameters())),
        "betas": betas_hist,
        "ref_betas": ref_betas,
        "calls": calls,
        "local_shapes": local_shapes,
    }


def run_mixed(rank, mesh, control):
    """Weights Shard(0), biases Replicate(); ``scope="model"`` mixes both in one sum.

    The control holds the same local values as plain tensors with
    ``process_group=WORLD``: the weight rows are still pieces (summed correctly),
    but the biases are now replicas that get summed over both ranks.
    """
    model = dc.make_model()
    named = list(model.named_parameters())
    world = mesh.size()

    def placed(t, is_weight):
        t = t.detach()
        if not control:
            return distribute_tensor(t, mesh, [Shard(0)] if is_weight else [Replicate()])
        return t.chunk(world, dim=0)[rank].clone() if is_weight else t.clone()

    def whole(q, like):
        if isinstance(q, DTensor):
            return q.full_tensor()
        if q.shape == like.shape:
            return q
        rows = [c.shape[0] for c in like.chunk(world, dim=0)]
        full = torch.zeros_like(like)
        full[sum(rows[:rank]):sum(rows[: rank + 1])] = q
        dist.all_reduce(full)  # zeros elsewhere: exact
        return full

    mine = [torch.nn.Parameter(placed(p, n.endswith("weight"))) for n, p in named]
    opt = dc.make_optimizer("sgd", [{"params": mine}], "model", process_group=dist.group.WORLD if control else None)
    params_hist, betas_hist, calls = [], [], []
    for x, y in dc.global_batches(STEPS):
        model.zero_grad()
        dc.loss_fn(model, x, y).backward()
        for (n, p), q in zip(named, mine):
            q.grad = placed(p.grad, n.endswith("weight"))
        with dc.CollectiveCounter() as counter:
            opt.step()
        calls.append(counter.calls)
        with torch.no_grad():
            for p, q in zip(model.parameters(), mine):
                p.copy_(whole(q, p))
        params_hist.append([p.detach().clone() for p in model.parameters()])
        betas_hist.append(opt.betas_per_scope().tolist())
        dc.decay_lr(opt)
    ref_params, ref_betas = dc.reference_run("sgd", "model", "one", STEPS)
    return {
        "max_param_diff": max(max_param_diff(a, b) for a, b in zip(params_hist, ref_params)),
        "betas": betas_hist,
        "ref_betas": ref_betas,
        "calls": calls,
    }


def main():
    """argv[1:]: ``fsdp2=<case>,<case>`` and/or ``mixed``, run in order in one launch."""
    rank, world = dc.init()
    mesh = init_device_mesh("cpu", (world,))
    result = {}
    with dc.exit_on_error():
        for token in sys.argv[1:]:
            mode, _, cases = token.partition("=")
            if mode == "fsdp2":
                for case in cases.split(","):
                    name, scope = case.split(":")
                    result.setdefault("fsdp2", {})[case] = run_fsdp2(rank, world, name, scope, mesh)
            elif mode == "mixed":
                result["mixed"] = {
                    "mixed": run_mixed(rank, mesh, control=False),
                    "control": run_mixed(rank, mesh, control=True),
                }
            else:
                raise SystemExit(f"unknown mode {mode}")
    dc.finish(result)


if __name__ == "__main__":
    main()
