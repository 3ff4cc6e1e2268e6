"""Compiled kernel sets and the CPU tiling (the bottom layer: imports nothing above it).

* :mod:`.interface` -- :class:`KernelSet`, the contract every compiled set meets, and the
  shared tensor check;
* :mod:`.cpu_build` -- builds and caches the C library;
* :mod:`.cpu` -- the C kernel set; :mod:`.triton` -- the Triton kernel set;
* :mod:`.tiling` -- cache-sized tiles for the multi-tensor path on CPU.

:func:`select_kernels` is the one place that decides which set (if any) steps a tensor list.
"""

from __future__ import annotations

from typing import Optional, Tuple

from .interface import KernelSet, TensorLists, tensor_problem

__all__ = ["KernelSet", "select_kernels", "tensor_problem"]


def select_kernels(lists: TensorLists, mirrored: bool = False) -> Tuple[Optional[KernelSet], Optional[str]]:
    """``(kernel set, None)`` when a compiled set can step these parallel tensor lists, else ``(None, why)``.
    ``mirrored``: every later list is known to mirror the first (:func:`.interface.tensor_problem`)."""
    device = next((t.device for lst in lists for t in lst), None)
    if device is None:
        return None, "no tensors"
    if device.type == "cpu":
        from . import cpu

        reason = cpu.decline(lists, mirrored)
        return (cpu, None) if reason is None else (None, reason)
    if device.type == "cuda":
        from . import triton  # imports Triton: only when CUDA tensors step

        reason = triton.decline(lists, mirrored)
        return (triton, None) if reason is None else (None, reason)
    return None, f"no fused kernels for {device.type} tensors"
