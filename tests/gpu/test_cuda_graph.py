"""``step()`` captured in a CUDA graph and replayed equals eager steps (skipped without CUDA).

Why it can be captured: step counts, products of betas, the coefficients and the restart flags
live on the device (docs/algorithm.md §10), the compiled kernels' tables are cached on the
warm-up steps, and the previous lr of a tensor lr is one buffer refreshed in place.  The lr is a
CUDA tensor changed between replays (``fill_``, as schedulers do), and the gradients are new
values copied into the same tensors before each replay, as in torch's own graph recipe.
Run with ``python -m pytest tests/gpu -q`` on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from hf_am import AMAdamW, AMSGD
from helpers import param_and_state_tensors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

OPTIMIZERS = {"am_adamw": AMAdamW, "am_sgd": AMSGD}
SHAPES = [(64, 48), (48,), (96, 64), (7,)]
WARMUP, REPLAYS = 3, 8


def _warm_up(opt, load=lambda k: None) -> None:
    """WARMUP steps off the capture stream (torch's recipe), ``load(k)`` before step k."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for k in range(WARMUP):
            load(k)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)


def _run(name, kwargs, graph: bool, dtype=torch.float32):
    """Train the same parameters on the same gradients and lrs, eagerly or by replaying one captured step."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    base = [torch.randn(s, generator=gen, device="cuda") for s in SHAPES]
    grads = [[torch.randn(s, generator=gen, device="cuda") * 1e-2 * (1 + k % 3) for s in SHAPES]
             for k in range(WARMUP + REPLAYS)]  # fmt: skip
    lrs = [1e-2 * (1 + 0.25 * (k % 4)) for k in range(WARMUP + REPLAYS)]
    params = [torch.nn.Parameter(b.to(dtype)) for b in base]
    static_grads = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, static_grads):
        p.grad = g
    lr = torch.tensor(lrs[0], device="cuda")
    groups = [dict(params=params[:2], weight_decay=0.1), dict(params=params[2:], weight_decay=0.0)]
    opt = OPTIMIZERS[name](groups, lr=lr, **kwargs)

    def load(k):
        for g, src in zip(static_grads, grads[k]):
            g.copy_(src)
        lr.fill_(lrs[k])

    if not graph:
        for k in range(WARMUP + REPLAYS):
            load(k)
            opt.step()
    else:
        _warm_up(opt, load)
        step = torch.cuda.CUDAGraph()
        with torch.cuda.graph(step):
            opt.step()
        for k in range(WARMUP, WARMUP + REPLAYS):
            load(k)
            step.replay()
    torch.cuda.synchronize()
    return params, opt


VARIANTS = {
    "default": {},
    "restart": {"restart_threshold": 0.4},
    "beta_min": {"beta_min": 0.5},
    "group_scope": {"scope": "group"},
    "model_scope": {"scope": "model"},
    "foreach": {"foreach": True},
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_graph_replay_equals_eager(name, variant):
    kwargs = {"scope": "tensor", **VARIANTS[variant]}
    eager_params, eager = _run(name, kwargs, graph=False)
    graph_params, replayed = _run(name, kwargs, graph=True)
    diff = max((a - b).abs().max().item() for a, b in zip(eager_params, graph_params))
    assert diff <= 1e-6, f"{name} {variant}: replayed parameters differ from eager by {diff:.3e}"
    # the statistics the Trainer logs come from the state the replays wrote
    assert torch.allclose(eager.beta_summary_tensor(), replayed.beta_summary_tensor(), atol=1e-6, equal_nan=True)
    # the previous lr the next replay reads is this step's
    for group in replayed.param_groups:
        assert group["am_prev_lr"].item() == pytest.approx(1e-2 * (1 + 0.25 * ((WARMUP + REPLAYS - 1) % 4)))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_graph_replay_equals_eager_bf16(name):
    eager_params, _ = _run(name, {"scope": "tensor"}, graph=False, dtype=torch.bfloat16)
    graph_params, _ = _run(name, {"scope": "tensor"}, graph=True, dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(eager_params, graph_params))


def test_a_capture_that_meets_new_tensors_refuses_before_any_launch():
    """New gradient tensors at capture time (not those of the warm-up): the kernels would build their pointer
    table inside the capture, from host memory the replays would read after it is freed.  The step raises,
    naming the remedy, and the parameters and state are those of the warm-up."""
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in SHAPES]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    opt = AMAdamW(params, lr=torch.tensor(1e-2, device="cuda"))
    _warm_up(opt)
    torch.cuda.synchronize()
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2  # new storage: a table the warm-up never built
    before = [t.clone() for t in param_and_state_tensors(params, opt)]
    with pytest.raises(RuntimeError, match="first time while a CUDA graph was being captured.*Nothing was changed"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            opt.step()
    torch.cuda.synchronize()
    after = param_and_state_tensors(params, opt)
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(before, after))
