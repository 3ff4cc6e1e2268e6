"""The Triton kernels on CPU tensors, in Triton's interpreter: the same optimizer runs with
``fused=True`` (Triton) and ``foreach=False`` (the per-tensor reference), and the
largest parameter difference is written as JSON.

Why a separate process: ``TRITON_INTERPRET=1`` must be set before Triton is imported
(``triton.jit`` decides then whether it compiles or interprets).  The one thing swapped
is the dispatch: ``_core.fused_kernels`` hands CPU tensors to the Triton module instead
of the C kernels; the optimizer code around the kernels is the real one.

usage: triton_interpret.py OUT.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from helpers import (  # noqa: E402
    CountedCalls, max_param_diff, param_and_state_tensors, per_group_am_adamw, train, trainer_split, two_groups,
)

import hf_am.kernels  # noqa: E402
from hf_am import AMAdamW, AMSGD  # noqa: E402
from hf_am.kernels import triton as triton_kernels  # noqa: E402
from hf_am.kernels.interface import tensor_problem  # noqa: E402

if triton_kernels.triton is None:
    raise SystemExit(
        "Triton is not importable: run `bash scripts/setup.sh test` (it installs Triton into "
        ".triton_interpreter/ on CPU-only machines) or `pip install triton`"
    )

INTERPRETED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_on_cpu(lists, mirrored=False):
    reason = tensor_problem(lists, INTERPRETED_DTYPES, "cpu", mirrored)
    return (triton_kernels, None) if reason is None else (None, reason)


hf_am.kernels.select_kernels = triton_on_cpu  # the one place a kernel set is chosen


class Model(torch.nn.Module):
    """Tensors of one program (biases), of several programs (the 130x140 matrix spans two
    CHUNKs) and an empty one (a rank's empty shard, with an empty gradient), so per-tensor
    sums cross programs."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(130, 140), torch.nn.Tanh(), torch.nn.Linear(140, 3))
        self.empty = torch.nn.Parameter(torch.zeros(0))

    def forward(self, x):
        return self.net(x) + self.empty.sum()


def make_model(dtype):
    torch.manual_seed(0)
    return Model().to(dtype)


def run(name, dtype, variant, steps=6):
    kw = dict(variant)
    wd, tensor_lr = kw.pop("wd", 0.0), kw.pop("tensor_lr", False)
    lr = 1e-2 if name == "am_adamw" else 0.3
    if name == "am_adamw" and dtype == torch.float16:
        # float16 holds no second moment below 6e-8: with eps=1e-8 both paths take steps of
        # lr * m / 1e-8 and diverge, so nothing could be compared; 1e-4 is the usual float16 eps.
        kw["eps"] = 1e-4
    cls = AMAdamW if name == "am_adamw" else AMSGD
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 130, generator=g).to(dtype), torch.randn(8, 3, generator=g).to(dtype)) for _ in range(steps)]
    models = [make_model(dtype), make_model(dtype)]
    opts = [
        cls(two_groups(m, wd=wd), lr=torch.tensor(lr) if tensor_lr else lr, **path, **kw)
        for m, path in zip(models, (dict(foreach=False), dict(fused=True)))
    ]
    triton_kernels._blocks_cache.clear()
    for model, opt in zip(models, opts):
        train(model, opt, batches, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s % 3)))
    return {
        "ran": len(triton_kernels._blocks_cache) > 0,
        "moved": max_param_diff(models[0], make_model(dtype)),
        "param_diff": max_param_diff(*models),
        "beta_diff": float((opts[0].betas_per_scope().double() - opts[1].betas_per_scope().double()).abs().max()),
    }


VARIANTS = {
    "model": dict(scope="model"),
    "tensor-restart-wd": dict(scope="tensor", restart_threshold=0.4, wd=0.05),
    "group-betamin-tensorlr": dict(scope="group", beta_min=0.5, tensor_lr=True),
}


def gate_cases():
    """Tensors that do not fit their parameter never reach the Triton kernels: a state tensor of
    another dtype (``model.to(float16)`` after a step) or size is a RuntimeError before any launch."""
    out = {}
    for case in ("dtype", "size"):
        model = make_model(torch.float32)
        opt = AMAdamW(model.parameters(), lr=1e-2, fused=True)
        x, y = torch.randn(8, 130), torch.randn(8, 3)
        train(model, opt, [(x, y)])
        if case == "dtype":
            model.to(torch.float16)
            x, y = x.half(), y.half()
        else:
            first = next(iter(model.parameters()))
            opt.state[first]["exp_avg_sq"] = torch.zeros(7)
        triton_kernels._blocks_cache.clear()
        before = [p.detach().clone() for p in model.parameters()]
        try:
            train(model, opt, [(x, y)])
            out[case] = {"error": None}
        except RuntimeError as exc:
            out[case] = {
                "error": str(exc),
                "launched": len(triton_kernels._blocks_cache) > 0,
                "unchanged": all(torch.equal(a, b) for a, b in zip(before, model.parameters())),
            }
    return out


def merged_cases():
    """AM-AdamW's groups that differ only in weight decay (the Trainer's two) run as one Triton launch per
    phase: the same bits as one launch per group (the base class's runs), in parameters, every state
    tensor and the summary the Trainer callback reads."""
    out = {}
    for scope, kw in (("tensor", dict(restart_threshold=0.4)), ("group", {})):
        runs = []
        for cls in (AMAdamW, per_group_am_adamw()):
            model = make_model(torch.float32)
            opt = cls(trainer_split(model), lr=1e-2, fused=True, scope=scope, **kw)
            g = torch.Generator().manual_seed(1)
            batches = [(torch.randn(8, 130, generator=g), torch.randn(8, 3, generator=g)) for _ in range(5)]
            with CountedCalls(triton_kernels, "adamw_sums") as launches:
                train(model, opt, batches, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s % 3)))
            runs.append((param_and_state_tensors(model.parameters(), opt), opt.beta_summary_tensor(),
                         launches.calls / len(batches)))
        (a, summary_a, per_step_a), (b, summary_b, per_step_b) = runs
        out[scope] = {
            "bits_equal": len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b)),
            "summary_equal": torch.equal(summary_a, summary_b),
            "sums_launches_per_step": [per_step_a, per_step_b],
        }
    return out


def main(out):
    results = {"gate": gate_cases(), "merged": merged_cases()}
    for name in ("am_adamw", "am_sgd"):
        for dtype in INTERPRETED_DTYPES:
            for key, variant in VARIANTS.items():
                results[f"{name}-{str(dtype).replace('torch.', '')}-{key}"] = run(name, dtype, variant)
    Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
