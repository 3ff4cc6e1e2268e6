"""Finding the AM optimizer inside the wrappers of accelerate, DeepSpeed and the Trainer, and wiring it up.

There is one way to find it (:func:`find_am_optimizer`) and one way to connect
it to the backend that shards its parameters (:func:`connect_optimizer`).
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch


def wrapper_chain(obj) -> List[Any]:
    """``obj`` and what it wraps, following ``.optimizer`` (accelerate's ``AcceleratedOptimizer``,
    DeepSpeed engine -> ZeRO optimizer -> client optimizer) and ``.engine`` (accelerate's
    ``DeepSpeedEngineWrapper``)."""
    chain: List[Any] = []
    seen = set()
    current = obj
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        nxt = getattr(current, "optimizer", None)
        if nxt is None:
            nxt = getattr(current, "engine", None)
        current = nxt
    return chain


def find_am_optimizer(obj) -> Optional[torch.optim.Optimizer]:
    """The :class:`hf_am.AMOptimizer` inside ``obj`` (wrappers unwrapped, see :func:`wrapper_chain`), or ``None``."""
    from ..optimizer import AMOptimizer

    return next((o for o in wrapper_chain(obj) if isinstance(o, AMOptimizer)), None)


def is_deepspeed_wrapped(optimizer) -> bool:
    return any(
        type(o).__module__.startswith("deepspeed.") or type(o).__name__ == "DeepSpeedOptimizerWrapper"
        for o in wrapper_chain(optimizer)
    )


def attach(obj, model=None) -> torch.optim.Optimizer:
    """Make the AM optimizer inside ``obj`` exact under the backend that shards its parameters; return it.

    Call it once after ``deepspeed.initialize`` (pass the engine or its optimizer) or after
    ``accelerator.prepare`` (pass the prepared optimizer, and ``model=`` the prepared model when it
    is FSDP1) in a custom training loop; the Trainer does the same by itself.  DDP, FSDP2 and
    one-process runs need nothing (calling it is harmless).  Without it, a step on parameters
    that DeepSpeed or FSDP1 sharded raises instead of training with a per-rank coefficient.
    """
    am = find_am_optimizer(obj)
    if am is None:
        chain = " -> ".join(type(o).__name__ for o in wrapper_chain(obj))
        raise TypeError(f"hf_am.attach: no hf_am.AMOptimizer found by following .optimizer/.engine from {chain}")
    if model is None and any(getattr(p, "_fsdp_flattened", False) for g in am.param_groups for p in g["params"]):
        if not is_deepspeed_wrapped(obj):
            raise ValueError(
                "hf_am.attach: the optimizer holds FSDP1-sharded parameters; pass the FSDP-wrapped model too: "
                "hf_am.attach(optimizer, model=model)"
            )
    return connect_optimizer(model, obj)


def connect_optimizer(model, optimizer) -> Optional[torch.optim.Optimizer]:
    """Wire the AM optimizer inside ``optimizer`` to the backend that shards its parameters; return it.

    * DeepSpeed: :func:`hf_am.integrations.deepspeed.attach_to_deepspeed` (ZeRO's data-parallel group,
      ZeRO-3 padding, scope checks).
    * FSDP1: :func:`hf_am.integrations.fsdp.connect_fsdp1` (the sharding group).
    * FSDP2 / DTensor parameters, DDP, one process: nothing to do.
    """
    am = find_am_optimizer(optimizer)
    if am is None:
        return None
    if is_deepspeed_wrapped(optimizer):
        from .deepspeed import attach_to_deepspeed

        attach_to_deepspeed(optimizer)
        return am
    from .fsdp import connect_fsdp1

    connect_fsdp1(model, am)
    return am
