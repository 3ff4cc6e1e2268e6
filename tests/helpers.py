"""The one copy of every helper the tests and their worker processes share.

Importable as ``helpers`` from tests (``tests/`` is on pytest's pythonpath) and
from worker processes (the launchers put ``tests/`` on their ``PYTHONPATH``);
``tests/conftest.py`` offers the same pieces as fixtures.
"""

from __future__ import annotations

import copy
import socket
from typing import Callable, Dict, List

import torch


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it), so parallel tests do not collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32, out_features: int = 3) -> torch.nn.Module:
    """A tiny MLP with tensors of several shapes (a matrix, vectors, a bias-free layer).

    Tensor sizes 48, 8, 40, 5, 15: odd sizes give DeepSpeed ZeRO-3 padding on 2 ranks,
    the 3-row and 5-row matrices give FSDP2 uneven shards.
    """
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 5),
        torch.nn.Tanh(),
        torch.nn.Linear(5, out_features, bias=False),
    )
    return model.to(dtype)


def deepspeed_config(stage: int, *, micro_batch="auto", **zero) -> dict:
    """A DeepSpeed config: ``micro_batch="auto"`` leaves batch, accumulation, clipping and
    precision to the Trainer (``TrainingArguments`` fills them in); a number pins them for a
    plain ``deepspeed.initialize`` run (no clipping: the 1-process reference does not clip)."""
    if micro_batch == "auto":
        base = {
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"},
            "fp16": {"enabled": "auto"},
        }
    else:
        base = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0,  # DeepSpeed's default elsewhere is 1.0
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
    return {**base, "zero_optimization": {"stage": stage, **zero}}


def make_batches(n: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> List[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 6, generator=g).to(dtype), torch.randn(16, 3, generator=g).to(dtype)) for _ in range(n)
    ]


def two_groups(model: torch.nn.Module, lr: float = 1e-2, wd: float = 0.05) -> List[Dict]:
    """Weights with decay and their own lr; biases without decay (Trainer's split)."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    return [
        {"params": decay, "weight_decay": wd},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr * 0.5},
    ]


def loss_fn(model, batch) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x).float(), y.float())


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches,
    scheduler=None,
    closure: bool = False,
    on_step: Callable = None,
) -> List[float]:
    losses = []
    for batch in batches:
        def closure_fn():
            optimizer.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            return loss

        if closure:
            loss = optimizer.step(closure_fn)
        else:
            loss = closure_fn()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(optimizer)
    return losses


def clone_model(model):
    return copy.deepcopy(model)


def _tensors(x) -> List[torch.Tensor]:
    if isinstance(x, torch.nn.Module):
        return list(x.parameters())
    if isinstance(x, dict):
        return [x[k] for k in sorted(x)]
    return list(x)


def max_param_diff(a, b) -> float:
    """Largest elementwise difference between two models, two ``{name: tensor}`` dicts or two
    tensor lists (empty tensors, a rank's empty shard, count as no difference)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (sorted(a), sorted(b))
    pairs = [(pa, pb) for pa, pb in zip(_tensors(a), _tensors(b))]
    return max([(pa.detach().double() - pb.detach().double()).abs().max().item() for pa, pb in pairs if pa.numel()] or [0.0])


def trainer_split(model: torch.nn.Module, wd: float = 0.05) -> List[Dict]:
    """The Trainer's two groups with one lr: decay on weights, none on biases (AM-AdamW steps them with one
    kernel call per phase, ``AMAdamW._phase_runs``)."""
    return [
        {"params": [p for n, p in model.named_parameters() if n.endswith("weight")], "weight_decay": wd},
        {"params": [p for n, p in model.named_parameters() if not n.endswith("weight")], "weight_decay": 0.0},
    ]


def per_group_am_adamw():
    """AM-AdamW with one kernel call per param group and phase (the base class's runs): what merged
    calls must equal bit for bit."""
    import hf_am
    from hf_am.optimizer import AMOptimizer

    class PerGroupAMAdamW(hf_am.AMAdamW):
        _phase_runs = AMOptimizer._phase_runs

    return PerGroupAMAdamW


class CountedCalls:
    """Counts the calls of ``owner.name`` while active (the real function still runs)."""

    def __init__(self, owner, name: str):
        self.owner, self.name, self.calls = owner, name, 0

    def __enter__(self):
        inner = self.inner = getattr(self.owner, self.name)

        def counted(*args, **kwargs):
            self.calls += 1
            return inner(*args, **kwargs)

        setattr(self.owner, self.name, counted)
        return self

    def __exit__(self, *exc):
        setattr(self.owner, self.name, self.inner)


def param_and_state_tensors(params, optimizer) -> List[torch.Tensor]:
    """Every parameter, then every tensor of their optimizer state (keys sorted): what two runs that
    must agree bit for bit are compared on."""
    params = list(params)
    state = [v for p in params for _, v in sorted(optimizer.state[p].items()) if torch.is_tensor(v)]
    return [p.detach() for p in params] + state
