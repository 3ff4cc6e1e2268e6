"""FSDP1 (``FullyShardedDataParallel``): the sharding group an AM optimizer must sum over (docs/algorithm.md §8).

FSDP2 needs nothing here: its parameters are DTensors, which carry their mesh.
"""

from __future__ import annotations

from typing import Any, Tuple

import torch


def fsdp1_process_group(model) -> Tuple[Any, bool]:
    """``(group, use_orig_params)`` of the FSDP1 (``FullyShardedDataParallel``) units in ``model``,
    or ``(None, False)`` without FSDP1.  With ``HYBRID_SHARD`` the group is the sharding group."""
    if not isinstance(model, torch.nn.Module):
        return None, False
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return None, False
    units = [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]
    if not units:
        return None, False
    import torch.distributed as dist

    groups = {tuple(dist.get_process_group_ranks(u.process_group)): u.process_group for u in units}
    if len(groups) > 1:
        raise ValueError(
            f"FSDP1 units shard over different process groups (ranks {sorted(groups)}); an AM optimizer sums "
            "its beta formula over one group. Use one sharding group (or FSDP2, whose DTensors carry their mesh)."
        )
    return next(iter(groups.values())), all(getattr(u, "_use_orig_params", False) for u in units)


def connect_fsdp1(model, am) -> None:
    """With ``use_orig_params=True``: ``process_group`` = the FSDP sharding group (parameters are flat
    views of this rank's shard).  Without it only ``scope="model"`` is exact (several tensors share
    one FlatParameter): other scopes are a ``ValueError``."""
    group, orig_params = fsdp1_process_group(model)
    if group is None:
        return
    if not orig_params and am.scope != "model":
        raise ValueError(
            f"FSDP1 without use_orig_params flattens several tensors into one FlatParameter, so "
            f"scope={am.scope!r} cannot be computed per tensor/group. Set fsdp_use_orig_params: true, "
            "use FSDP2, or --optim_args scope=model."
        )
    if am.process_group is None:
        am.process_group = group
