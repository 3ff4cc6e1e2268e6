"""Small deterministic problems shared by the optimizer tests."""

from __future__ import annotations

import copy
from typing import Callable, Dict, List

import torch


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny MLP with tensors of several shapes (a matrix, vectors, a bias-free layer)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 5),
        torch.nn.Tanh(),
        torch.nn.Linear(5, 3, bias=False),
    )
    return model.to(dtype)


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


def max_param_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest elementwise difference over the parameters (empty ones, a rank's empty shard, have none)."""
    pairs = [(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()) if pa.numel()]
    return max((pa.double() - pb.double()).abs().max().item() for pa, pb in pairs)
