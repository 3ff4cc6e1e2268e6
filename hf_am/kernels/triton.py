"""The Triton kernel set (:class:`hf_am.kernels.interface.KernelSet`): the GPU twin of :mod:`hf_am.kernels.cpu`.

Why: per-tensor coefficients are lists of 0-dim tensors, which send every
``torch._foreach_*`` op down its per-tensor path, so the multi-tensor step is
bound by kernel launches (thousands per step).  Here each phase of a step is one
launch over all tensors of a group: a table maps every program to a block of a
tensor, and tables of data pointers give each program its tensors.  Per-block
partial sums are added per tensor through a float64 running sum, so results are
deterministic.  Everything stays on the device: pointer tables travel through
pinned memory without a synchronisation, per-tensor scalars are device arrays.

Available when Triton imports and a CUDA device is present; ``HF_AM_TRITON=0``
turns the kernels off (the multi-tensor path runs instead).
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch

from .interface import TensorLists, mark_written, tensor_problem, to_device

try:  # Triton ships with torch's CUDA builds; CPU builds and other platforms go without.
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the installation
    triton = None

BLOCK = 1024  # elements per program iteration
CHUNK = 16 * BLOCK  # elements per program (a program loops over its chunk)

NAME = "triton"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available() -> bool:
    return triton is not None and os.environ.get("HF_AM_TRITON", "1") != "0" and torch.cuda.is_available()


def decline(lists: TensorLists, mirrored: bool = False) -> Optional[str]:
    """Why the Triton kernels cannot step these parallel tensor lists, or ``None`` when they can
    (``mirrored``: see :func:`~hf_am.kernels.interface.tensor_problem`)."""
    if not available():
        return "Triton or CUDA unavailable (or HF_AM_TRITON=0)"
    return tensor_problem(lists, DTYPES, "cuda", mirrored)


if triton is not None:
    CHUNK_C = tl.constexpr(CHUNK)

    @triton.jit
    def _block_of(pid, block_tensor, block_start, numels):
        t = tl.load(block_tensor + pid)
        start = tl.load(block_start + pid)
        end = tl.minimum(start + CHUNK_C, tl.load(numels + t))
        return t, start, end

    @triton.jit
    def _adamw_sums_kernel(g_ptrs, m_ptrs, v_ptrs, numels, block_tensor, block_start, eps_scaled, d_scale,
                           partial, beta2, DTYPE: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        t, start, end = _block_of(pid, block_tensor, block_start, numels)
        g_base = tl.load(g_ptrs + t).to(tl.pointer_type(DTYPE))
        m_base = tl.load(m_ptrs + t).to(tl.pointer_type(DTYPE))
        v_base = tl.load(v_ptrs + t).to(tl.pointer_type(DTYPE))
        eps = tl.load(eps_scaled + t)
        scale = tl.load(d_scale + t)
        sdd = tl.zeros([BLOCK_C], dtype=tl.float32)
        sgd = tl.zeros([BLOCK_C], dtype=tl.float32)
        sdiff = tl.zeros([BLOCK_C], dtype=tl.float32)
        for i in range(0, CHUNK_C // BLOCK_C):  # a fixed trip count; masks end the tensor
            idx = start + i * BLOCK_C + tl.arange(0, BLOCK_C)
            mask = idx < end
            g = tl.load(g_base + idx, mask=mask, other=0.0).to(tl.float32)
            m = tl.load(m_base + idx, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(v_base + idx, mask=mask, other=0.0).to(tl.float32)
            v = beta2 * v + (1.0 - beta2) * (g * g)  # v' (stored by the update kernel)
            inv = 1.0 / (tl.sqrt(v) + eps)
            d = scale * m
            diff = g - d
            sdd += d * d * inv
            sgd += g * d * inv
            sdiff += diff * diff * inv
        tl.store(partial + 3 * pid + 0, tl.sum(sdd, axis=0))
        tl.store(partial + 3 * pid + 1, tl.sum(sgd, axis=0))
        tl.store(partial + 3 * pid + 2, tl.sum(sdiff, axis=0))

    @triton.jit
    def _adamw_update_kernel(p_ptrs, g_ptrs, m_ptrs, v_ptrs, numels, block_tensor, block_start, beta2, eps_scaled,
                             keep, weight, decay, step, DTYPE: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        t, start, end = _block_of(pid, block_tensor, block_start, numels)
        p_base = tl.load(p_ptrs + t).to(tl.pointer_type(DTYPE))
        g_base = tl.load(g_ptrs + t).to(tl.pointer_type(DTYPE))
        m_base = tl.load(m_ptrs + t).to(tl.pointer_type(DTYPE))
        v_base = tl.load(v_ptrs + t).to(tl.pointer_type(DTYPE))
        eps = tl.load(eps_scaled + t)
        k = tl.load(keep + t)
        w = tl.load(weight + t)
        dec = tl.load(decay + t)
        s = tl.load(step + t)
        for i in range(0, CHUNK_C // BLOCK_C):  # a fixed trip count; masks end the tensor
            idx = start + i * BLOCK_C + tl.arange(0, BLOCK_C)
            mask = idx < end
            g = tl.load(g_base + idx, mask=mask, other=0.0).to(tl.float32)
            m = k * tl.load(m_base + idx, mask=mask, other=0.0).to(tl.float32)
            m = m + w * (g - m)
            tl.store(m_base + idx, m.to(DTYPE), mask=mask)
            v = tl.load(v_base + idx, mask=mask, other=0.0).to(tl.float32)
            v = beta2 * v + (1.0 - beta2) * (g * g)  # v', unrounded here as in the reference path
            tl.store(v_base + idx, v.to(DTYPE), mask=mask)
            p = tl.load(p_base + idx, mask=mask, other=0.0).to(tl.float32)
            p = dec * p + s * m / (tl.sqrt(v) + eps)
            tl.store(p_base + idx, p.to(DTYPE), mask=mask)

    @triton.jit
    def _sgd_sums_kernel(g_ptrs, x_ptrs, d_ptrs, numels, block_tensor, block_start, partial, weight_decay,
                         DTYPE: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        t, start, end = _block_of(pid, block_tensor, block_start, numels)
        g_base = tl.load(g_ptrs + t).to(tl.pointer_type(DTYPE))
        x_base = tl.load(x_ptrs + t).to(tl.pointer_type(DTYPE))
        d_base = tl.load(d_ptrs + t).to(tl.pointer_type(DTYPE))
        sdd = tl.zeros([BLOCK_C], dtype=tl.float32)
        sgd = tl.zeros([BLOCK_C], dtype=tl.float32)
        sdiff = tl.zeros([BLOCK_C], dtype=tl.float32)
        for i in range(0, CHUNK_C // BLOCK_C):  # a fixed trip count; masks end the tensor
            idx = start + i * BLOCK_C + tl.arange(0, BLOCK_C)
            mask = idx < end
            g = tl.load(g_base + idx, mask=mask, other=0.0).to(tl.float32)
            g += weight_decay * tl.load(x_base + idx, mask=mask, other=0.0).to(tl.float32)
            d = tl.load(d_base + idx, mask=mask, other=0.0).to(tl.float32)
            diff = g - d
            sdd += d * d
            sgd += g * d
            sdiff += diff * diff
        tl.store(partial + 3 * pid + 0, tl.sum(sdd, axis=0))
        tl.store(partial + 3 * pid + 1, tl.sum(sgd, axis=0))
        tl.store(partial + 3 * pid + 2, tl.sum(sdiff, axis=0))

    @triton.jit
    def _sgd_update_kernel(x_ptrs, g_ptrs, d_ptrs, numels, block_tensor, block_start, weight, step, weight_decay,
                           DTYPE: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        t, start, end = _block_of(pid, block_tensor, block_start, numels)
        x_base = tl.load(x_ptrs + t).to(tl.pointer_type(DTYPE))
        g_base = tl.load(g_ptrs + t).to(tl.pointer_type(DTYPE))
        d_base = tl.load(d_ptrs + t).to(tl.pointer_type(DTYPE))
        w = tl.load(weight + t)
        s = tl.load(step + t)
        for i in range(0, CHUNK_C // BLOCK_C):  # a fixed trip count; masks end the tensor
            idx = start + i * BLOCK_C + tl.arange(0, BLOCK_C)
            mask = idx < end
            x = tl.load(x_base + idx, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_base + idx, mask=mask, other=0.0).to(tl.float32) + weight_decay * x
            d = tl.load(d_base + idx, mask=mask, other=0.0).to(tl.float32)
            d = (d + w * (g - d)).to(DTYPE)
            tl.store(d_base + idx, d, mask=mask)
            tl.store(x_base + idx, (x + s * d.to(tl.float32)).to(DTYPE), mask=mask)  # the stored d, as SGD


class _Blocks:
    """Program -> (tensor, first element) tables of one list of sizes (cached: sizes rarely change).

    A tensor's programs are consecutive, so its sum is a difference of two entries of the
    running sum of the programs' partial sums, taken in float64: deterministic, exact to far
    below float32 rounding, and memory linear in the number of programs.
    """

    def __init__(self, numels: Tuple[int, ...], device):
        owners, starts, bounds = [], [], [0]
        for t, n in enumerate(numels):
            blocks = max(1, -(-n // CHUNK))
            owners += [t] * blocks
            starts += [b * CHUNK for b in range(blocks)]
            bounds.append(bounds[-1] + blocks)
        self.n_programs = len(owners)
        self.numels = to_device(list(numels), torch.int64, device)
        self.block_tensor = to_device(owners, torch.int32, device)
        self.block_start = to_device(starts, torch.int64, device)
        # Tensor t owns programs bounds[t]..bounds[t+1]; row 0 of `ends` holds the later bound and row 1
        # the earlier, so both ends of every tensor's run are one gather.
        self.ends = to_device([bounds[1:], bounds[:-1]], torch.int64, device)

    def per_tensor(self, partial: torch.Tensor) -> torch.Tensor:
        running = torch.cat((partial.new_zeros(1, 3, dtype=torch.float64), partial.double().cumsum(0)))
        later, earlier = running[self.ends]
        return (later - earlier).float()


_blocks_cache: Dict[tuple, _Blocks] = {}
_pointer_cache: Dict[tuple, torch.Tensor] = {}
# The cache keys are read every launch: map over the unbound methods, ~30% faster than a generator.
_NUMEL, _DATA_PTR = torch.Tensor.numel, torch.Tensor.data_ptr


def _blocks(tensors) -> _Blocks:
    key = (tensors[0].device, tuple(map(_NUMEL, tensors)))
    hit = _blocks_cache.get(key)
    if hit is None:
        if len(_blocks_cache) > 64:
            _blocks_cache.clear()
        hit = _blocks_cache[key] = _Blocks(key[1], tensors[0].device)
    return hit


def _pointers(tensors) -> torch.Tensor:
    key = (tensors[0].device, tuple(map(_DATA_PTR, tensors)))
    hit = _pointer_cache.get(key)
    if hit is None:
        if len(_pointer_cache) > 256:  # gradients get new storage every step
            _pointer_cache.clear()
        hit = _pointer_cache[key] = to_device(list(key[1]), torch.int64, tensors[0].device)
    return hit


def _scalars(values, like: torch.Tensor, n: int) -> torch.Tensor:
    """Per-tensor scalars as a contiguous float32 array of ``n`` on ``like``'s device, for a kernel to
    read one entry per tensor.

    Most of a step's scalars already are such vectors (computed on the device in the accumulation
    dtype), and they are handed over as they are: every op that computes is a launch and some microseconds of
    host time on a GPU.  Another vector of ``n`` on the device is converted (one op), a 0-dim tensor on
    the device is broadcast (no read of its value: that would synchronise), and a Python number or a
    CPU 0-dim tensor is a fill on the device, never a synchronising transfer.  Anything else raises
    before a kernel could read past the end of the array.
    """
    device = like.device
    if isinstance(values, torch.Tensor) and values.device == device:
        if values.dim() == 0:
            return values.to(torch.float32).expand(n).contiguous()
        if values.shape != (n,):
            raise ValueError(f"per-tensor scalars: expected {n} values on {device}, got shape {tuple(values.shape)}")
        return values.to(torch.float32).contiguous()
    if isinstance(values, torch.Tensor) and (values.device.type != "cpu" or values.dim() != 0):
        raise ValueError(f"per-tensor scalars: a tensor on {values.device} of shape {tuple(values.shape)} cannot "
                         f"be read on {device}; give a vector of {n} on {device}, a CPU 0-dim tensor or a number")
    return torch.full((n,), float(values), dtype=torch.float32, device=device)


def _tl_dtype(dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def adamw_sums(grads, exp_avgs, exp_avg_sqs, beta2: float, eps_scaled, d_scale) -> torch.Tensor:
    """Per-tensor sums with this step's second moment v'; reads only (:func:`adamw_update` stores v')."""
    blocks = _blocks(grads)
    n = len(grads)
    partial = torch.empty(blocks.n_programs, 3, dtype=torch.float32, device=grads[0].device)
    _adamw_sums_kernel[(blocks.n_programs,)](
        _pointers(grads), _pointers(exp_avgs), _pointers(exp_avg_sqs), blocks.numels, blocks.block_tensor,
        blocks.block_start, _scalars(eps_scaled, grads[0], n), _scalars(d_scale, grads[0], n), partial,
        float(beta2), DTYPE=_tl_dtype(grads[0].dtype), BLOCK_C=BLOCK,
    )  # fmt: skip
    return blocks.per_tensor(partial)


def adamw_update(params, grads, exp_avgs, exp_avg_sqs, beta2: float, eps_scaled, keep, weight, decay, step) -> None:
    blocks = _blocks(params)
    n, like = len(params), params[0]
    _adamw_update_kernel[(blocks.n_programs,)](
        _pointers(params), _pointers(grads), _pointers(exp_avgs), _pointers(exp_avg_sqs), blocks.numels,
        blocks.block_tensor, blocks.block_start, float(beta2), _scalars(eps_scaled, like, n),
        _scalars(1.0 if keep is None else keep, like, n), _scalars(weight, like, n), _scalars(decay, like, n),
        _scalars(step, like, n), DTYPE=_tl_dtype(like.dtype), BLOCK_C=BLOCK,
    )  # fmt: skip
    mark_written(params, exp_avgs, exp_avg_sqs)


def sgd_sums(grads, params, buffers, weight_decay: float) -> torch.Tensor:
    blocks = _blocks(grads)
    partial = torch.empty(blocks.n_programs, 3, dtype=torch.float32, device=grads[0].device)
    _sgd_sums_kernel[(blocks.n_programs,)](
        _pointers(grads), _pointers(params), _pointers(buffers), blocks.numels, blocks.block_tensor,
        blocks.block_start, partial, float(weight_decay), DTYPE=_tl_dtype(grads[0].dtype), BLOCK_C=BLOCK,
    )  # fmt: skip
    return blocks.per_tensor(partial)


def sgd_update(params, grads, buffers, weight_decay: float, weight, step) -> None:
    blocks = _blocks(params)
    n, like = len(params), params[0]
    _sgd_update_kernel[(blocks.n_programs,)](
        _pointers(params), _pointers(grads), _pointers(buffers), blocks.numels, blocks.block_tensor,
        blocks.block_start, _scalars(weight, like, n), _scalars(step, like, n), float(weight_decay),
        DTYPE=_tl_dtype(like.dtype), BLOCK_C=BLOCK,
    )  # fmt: skip
    mark_written(params, buffers)
