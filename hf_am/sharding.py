"""Which collective (if any) makes a tensor's partial sums whole.

docs/algorithm.md §8: the three sums of the beta formula are taken over the
*whole* scope.  A rank only holds part of a sharded tensor, so its partial sums
must be all-reduced over the ranks that hold the other parts, and over nobody
else (summing over replicas would count every element several times).
"""

from __future__ import annotations

from typing import Hashable, Optional, Sequence, Tuple

import torch

try:  # DTensor moved to the public namespace in torch 2.4.
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch
    try:
        from torch.distributed._tensor import DTensor  # type: ignore
    except ImportError:
        DTensor = None  # type: ignore


def is_dtensor(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_view(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (sharing storage), or the tensor itself."""
    return t._local_tensor if is_dtensor(t) else t


def reduction_groups(param: torch.Tensor, process_group) -> Tuple[Hashable, Sequence]:
    """``(key, groups)``: the process groups a parameter's partial sums are summed over.

    * DTensor parameter (FSDP2, tensor parallel): the groups of the mesh dimensions
      on which it is *sharded*; replicated dimensions are left out.
    * plain tensor with ``process_group``: that group (ZeRO flat partitions, FSDP1).
    * otherwise: no group at all (a whole tensor, or a DDP replica).

    ``key`` is hashable and equal for parameters that share the same groups, so
    the caller can run one collective per distinct key.
    """
    if is_dtensor(param):
        mesh = param.device_mesh
        dims = tuple(i for i, placement in enumerate(param.placements) if placement.is_shard())
        if not dims or mesh.size() == 1:
            return None, ()
        groups = tuple(mesh.get_group(i) for i in dims if mesh.size(i) > 1)
        if not groups:
            return None, ()
        return ("mesh", tuple(id(g) for g in groups)), groups
    if process_group is not None:
        return ("process_group", id(process_group)), (process_group,)
    return None, ()


def all_reduce_sum(tensor: torch.Tensor, groups: Sequence) -> torch.Tensor:
    """Sum ``tensor`` in place over each group in turn (one collective per group)."""
    import torch.distributed as dist

    for group in groups:
        if tensor.device.type == "cpu" and _needs_device_tensor(group):
            # ZeRO-Offload keeps the fp32 partitions (and so these sums) on the CPU, while the
            # data-parallel group may be NCCL-only: reduce a device copy.
            on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_device, op=dist.ReduceOp.SUM, group=group)
            tensor.copy_(on_device)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def _needs_device_tensor(group) -> bool:
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    return "nccl" in backend and "gloo" not in backend and "cpu:" not in backend


def gather_objects(obj, group) -> list:
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def optional_numel(param: torch.Tensor) -> int:
    """Number of elements of the *whole* tensor, also for DeepSpeed ZeRO-3 params."""
    ds_numel: Optional[int] = getattr(param, "ds_numel", None)
    if ds_numel is not None:
        return int(ds_numel)
    return param.numel()
