"""The C kernel set (:class:`hf_am.kernels.interface.KernelSet`): ctypes calls into the library
:mod:`hf_am.kernels.cpu_build` builds.

They cover contiguous float32/float64 CPU tensors, the case where torch's
per-op dispatch makes the multi-tensor path slow (CPU training, DeepSpeed
ZeRO-Offload).  Each phase is one pass over each tensor, split over threads.
"""

from __future__ import annotations

import ctypes
import operator
from typing import List, NamedTuple, Optional, Sequence

import torch

from .cpu_build import build_error, library
from .interface import BoundedCache, TensorLists, inside_storage, mark_written, remembered_check, tensor_problem

NAME = "cpu"  # the C kernels
DTYPES = (torch.float32, torch.float64)


def decline(lists: TensorLists, mirrored: bool = False) -> Optional[str]:
    """Why the C kernels cannot step these parallel tensor lists, or ``None`` when they can
    (``mirrored``: see :func:`~hf_am.kernels.interface.tensor_problem`)."""
    reason = tensor_problem(lists, DTYPES, "cpu", mirrored)
    if reason is None and library() is None:
        reason = f"the CPU kernels are unavailable ({build_error()})"
    return reason


# ctypes arrays of addresses and sizes, by their values: parameters and optimizer state keep their
# storage between steps (and gradients do under zero_grad(set_to_none=False)), so a step usually
# finds its arrays here instead of building them (a few tens of microseconds each at 200 tensors).
# The arrays are read-only to the kernels; a call holds its own references, so eviction is safe.
_ARRAYS = BoundedCache(64)


def _array(ctype, values: tuple):
    key = (ctype, values)
    arr = _ARRAYS.get(key)
    if arr is None:
        arr = (ctype * len(values))(*values)
        _ARRAYS.put(key, arr)
    return arr


class _Call:
    """ctypes arguments for parallel tensor lists, kept alive for the duration of a call."""

    def __init__(self, first: Sequence[torch.Tensor]):
        self.n = len(first)
        self.bits = 64 if first[0].dtype == torch.float64 else 32
        self.numel = _array(ctypes.c_int64, tuple(map(torch.Tensor.numel, first)))  # map: no Python frame per tensor
        self.keep: List[object] = [self.numel]

    def pointers(self, tensors: Sequence[torch.Tensor]):
        arr = _array(ctypes.c_void_p, tuple(map(torch.Tensor.data_ptr, tensors)))
        self.keep.append(arr)
        return arr

    def doubles(self, values: Optional[torch.Tensor]):
        """Per-tensor scalars as a contiguous float64 CPU tensor's address (None: NULL)."""
        if values is None:
            return None
        # Only the ops needed: the values are usually float64 CPU vectors already, and each op
        # costs a few microseconds of dispatch (x6 per call).  The kernel reads the memory only.
        if values.dtype != torch.float64 or values.device.type != "cpu":
            values = values.to(device="cpu", dtype=torch.float64)
        if values.dim() != 1:
            values = values.reshape(-1)
        if not values.is_contiguous():
            values = values.contiguous()
        if values.numel() != self.n:
            values = values.expand(self.n).contiguous()
        self.keep.append(values)
        return values.data_ptr()


def _check(status: int, name: str) -> None:
    if status != 0:
        raise RuntimeError(f"hf_am CPU kernel {name} failed (status {status}: out of memory, before touching any tensor)")


def adamw_sums(grads, exp_avgs, exp_avg_sqs, beta2: float, eps_scaled, d_scale) -> torch.Tensor:
    """Per tensor ``[<d,d>, <g,d>, <g-d,g-d>]`` in the metric 1/D' of this step's second moment
    ``v' = beta2*v + (1-beta2)*g^2`` (float64).  Reads only: :func:`adamw_update` stores ``v'``."""
    call = _Call(grads)
    out = torch.zeros(call.n, 3, dtype=torch.float64)
    status = library().am_adamw_sums(
        call.bits, torch.get_num_threads(), call.n, call.numel,
        call.pointers(grads), call.pointers(exp_avgs), call.pointers(exp_avg_sqs),
        float(beta2), call.doubles(eps_scaled), call.doubles(d_scale), out.data_ptr(),
    )  # fmt: skip
    _check(status, "am_adamw_sums")
    return out


def adamw_update(params, grads, exp_avgs, exp_avg_sqs, beta2: float, eps_scaled, keep, weight, decay, step) -> None:
    """``v = v'; m = keep*m; m += weight*(g - m); p = decay*p + step*m/(sqrt(v') + eps')`` per tensor, in place."""
    call = _Call(params)
    status = library().am_adamw_update(
        call.bits, torch.get_num_threads(), call.n, call.numel,
        call.pointers(params), call.pointers(grads), call.pointers(exp_avgs), call.pointers(exp_avg_sqs),
        float(beta2), call.doubles(eps_scaled), call.doubles(keep), call.doubles(weight), call.doubles(decay), call.doubles(step),
    )  # fmt: skip
    _check(status, "am_adamw_update")
    mark_written(params, exp_avgs, exp_avg_sqs)


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, *, beta2: float, eps_scaled, d_scale, bias2_sqrt, prods, eta, eta_b,
               decay, neg_lr: float, has_restarts: bool, scope_ids: Sequence[int], n_scopes: int, hyper: torch.Tensor,
               has_threshold: bool):
    """A whole AM-AdamW step in one C call, where every tensor is its own scope and nothing between the
    passes needs Python (scope="tensor", linear loss estimate, no collective: docs/algorithm.md §10).

    Phase 1's sums, then each tensor's coefficient, product of coefficients and step size with the bits of
    the Python definitions the two-call step runs
    (:func:`hf_am.reduction.scope_sums`' lr weights, :func:`hf_am.coefficient.step_coefficients`, AM-AdamW's
    ``_apply_update``), then phase 2.  ``bias2_sqrt``, ``prods``: per tensor, in the parameters' precision;
    ``eta``, ``eta_b``: the lr weights of ``A``/``C`` and of ``B``; ``hyper`` as :func:`step_coefficients`
    takes it, per scope; ``scope_ids``: each tensor's scope, ``0 <= id < n_scopes``, no two alike.  Returns
    ``(coefficients, prods_new, sums)``: the ``(5, n_scopes)`` float64 rows adaptive, reported, applied,
    restart, fallback (zeros in scopes without a tensor here), the new products (parameter precision) and
    each tensor's unweighted sums ``(n, 3)``.  Arguments are checked here and again in C; a refused or
    failed call has touched nothing.
    """
    acc = params[0].dtype if len(params) else None
    if acc not in DTYPES or any(len(lst) != len(params) for lst in (grads, exp_avgs, exp_avg_sqs)):
        # shapes and layouts are decline()'s contract (the planning gate), as for the other entry points;
        # these two size the output and the pointer arrays the C code walks
        raise ValueError(f"adamw_step: needs four tensor lists of one length of float32/float64 tensors, got "
                         f"lengths {[len(x) for x in (params, grads, exp_avgs, exp_avg_sqs)]} and dtype {acc}")
    call = _Call(params)
    n = call.n
    ids = tuple(scope_ids)
    if len(ids) != n or len(set(ids)) != n or (n and (min(ids) < 0 or max(ids) >= n_scopes)):
        raise ValueError(f"adamw_step: scope_ids must hold {n} distinct scope indices in [0, {n_scopes}), got "
                         f"{len(ids)} ({len(set(ids))} distinct) from {min(ids, default=None)} to {max(ids, default=None)}")
    hyper_fits = _is_double(hyper) and hyper.dim() == 2 and hyper.shape[0] == 4 and hyper.shape[1] in (1, n_scopes)
    if not hyper_fits:
        raise ValueError(f"adamw_step: hyper must be a contiguous (4, 1) or (4, {n_scopes}) float64 CPU tensor, got {_what(hyper)}")
    lib = library()
    if lib is None:
        raise RuntimeError(f"the CPU kernels are unavailable ({build_error()})")
    coefficients = torch.zeros(5, n_scopes, dtype=torch.float64)
    prods_new = torch.empty(n, dtype=acc)
    sums = torch.zeros(n, 3, dtype=torch.float64)
    status = lib.am_adamw_step(
        call.bits, torch.get_num_threads(), n, call.numel,
        call.pointers(params), call.pointers(grads), call.pointers(exp_avgs), call.pointers(exp_avg_sqs),
        float(beta2), call.doubles(eps_scaled), call.doubles(d_scale), call.doubles(bias2_sqrt), call.doubles(prods),
        call.doubles(eta), call.doubles(eta_b), call.doubles(decay), float(neg_lr), int(bool(has_restarts)),
        _array(ctypes.c_int64, ids), int(n_scopes), hyper.data_ptr(), hyper.shape[1], int(bool(has_threshold)),
        coefficients.data_ptr(), prods_new.data_ptr(), sums.data_ptr(),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"hf_am CPU kernel am_adamw_step failed (status {status}: "
                           f"{'out of memory' if status == 1 else 'arguments out of range'}); nothing was changed")
    mark_written(params, exp_avgs, exp_avg_sqs)
    return coefficients, prods_new, sums


def sgd_sums(grads, params, buffers, weight_decay: float) -> torch.Tensor:
    """Per tensor ``[<d,d>, <g',d>, <g'-d,g'-d>]`` with ``g' = g + wd*x`` (float64)."""
    call = _Call(grads)
    out = torch.zeros(call.n, 3, dtype=torch.float64)
    status = library().am_sgd_sums(
        call.bits, torch.get_num_threads(), call.n, call.numel,
        call.pointers(grads), call.pointers(params), call.pointers(buffers), float(weight_decay), out.data_ptr(),
    )  # fmt: skip
    _check(status, "am_sgd_sums")
    return out


def sgd_update(params, grads, buffers, weight_decay: float, weight, step) -> None:
    """``d += weight*(g' - d); x += step*d`` per tensor, in place (``g' = g + wd*x``)."""
    call = _Call(params)
    status = library().am_sgd_update(
        call.bits, torch.get_num_threads(), call.n, call.numel,
        call.pointers(params), call.pointers(grads), call.pointers(buffers), float(weight_decay),
        call.doubles(weight), call.doubles(step),
    )  # fmt: skip
    _check(status, "am_sgd_update")
    mark_written(params, buffers)


_DTYPE, _IS_CPU = operator.attrgetter("dtype"), operator.attrgetter("is_cpu")


_IS_DOUBLE = {torch.float32: 0, torch.float64: 1}


class _CheckedScalars(NamedTuple):
    addresses: ctypes.Array  #: void *[n]
    flags: ctypes.Array  #: unsigned char[n], is_double
    dtypes: tuple


def _plain_scalar_flags(tensors: Sequence[torch.Tensor]) -> Optional[tuple]:
    """The ``is_double`` flags of plain (not a subclass) one-element float32/float64 CPU tensors that are not
    lazily negated views (a negated view holds its value un-negated in memory), else ``None``; their
    storage is not looked at here."""
    if set(map(type, tensors)) != {torch.Tensor} or not all(map(_IS_CPU, tensors)):
        return None
    flags = tuple(map(_IS_DOUBLE.get, map(_DTYPE, tensors)))
    if None in flags or set(map(torch.Tensor.numel, tensors)) != {1} or any(map(torch.Tensor.is_neg, tensors)):
        return None
    return flags


def _check_scalars(tensors: Sequence[torch.Tensor], addresses: tuple, dtypes: tuple) -> Optional[_CheckedScalars]:
    flags = _plain_scalar_flags(tensors)
    if flags is None or 0 in addresses or not inside_storage(tensors):
        return None
    return _CheckedScalars((ctypes.c_void_p * len(addresses))(*addresses), (ctypes.c_ubyte * len(flags))(*flags), dtypes)


def _scalar_arrays(tensors: Sequence[torch.Tensor]) -> Optional[_CheckedScalars]:
    """The addresses, ``is_double`` flags and dtypes of one-element state tensors as the C code takes them,
    or ``None`` unless every tensor is a plain (not a subclass) one-element float32/float64 CPU tensor, not a
    lazily negated view, inside its storage: the only scalar memory this module hands to C.  Checked in full
    where the objects, their addresses or their dtypes changed since the last full check
    (:func:`~hf_am.kernels.interface.remembered_check`)."""
    return remembered_check("cpu scalars", tensors, _check_scalars) if tensors else None


def adamw_scalars(steps: Sequence[torch.Tensor], prods: Sequence[torch.Tensor], beta2: float, eps: float,
                  dtype: torch.dtype) -> Optional[torch.Tensor]:
    """AM-AdamW's per-tensor scalars of a step from the tensors' step counts and products of applied
    coefficients, in one C call: a ``(5, n)`` tensor of ``dtype`` with the rows ``t = step + 1``, the
    product, ``c = sqrt(1 - beta2^t)``, d's scale ``1 / (1 - product)`` (0 where the product is not below 1)
    and ``eps * c`` (the definitions: AM-AdamW's ``_counts_and_products`` and
    :func:`hf_am.multi_tensor.adamw_bias_terms`; ``beta2^t`` here is libm's double ``pow``, rounded once to
    float32 for float32, and torch's is within an ulp of it).

    Returns ``None`` when a tensor is anything but a plain one-element CPU tensor of ``dtype`` (float32 or
    float64), or the library is unavailable: the caller then runs the torch definitions, which accept any
    floating dtype.  The C code reads one value of ``dtype`` at each tensor's address, so every tensor is
    checked here first, every step (the optimizer's gate compares these state objects by identity only), in
    full where an object, its address or its dtype changed since the last full check (:func:`_scalar_arrays`).
    """
    n = len(steps)
    if dtype not in DTYPES or n == 0 or len(prods) != n:
        return None
    tensors = (*steps, *prods)
    checked = _scalar_arrays(tensors)
    lib = library()
    if checked is not None and lib is not None:
        if set(checked.dtypes) != {dtype}:
            return None
        out = torch.empty(5, n, dtype=dtype)
        addresses = checked.addresses  # the step counts' n addresses, then the products'
        prods_at = ctypes.addressof(addresses) + n * ctypes.sizeof(ctypes.c_void_p)
        status = lib.am_adamw_scalars(64 if dtype == torch.float64 else 32, n, addresses, prods_at, float(beta2), float(eps), out.data_ptr())
        if status != 0:
            raise RuntimeError(f"hf_am CPU kernel am_adamw_scalars refused its arguments (status {status}); nothing was changed")
        return out
    # Declined: say why.  Anything but plain one-element tensors of `dtype` runs the torch definitions; plain
    # ones declined lie outside their storage, an error (torch's ops would crash on them too).
    if lib is None or _plain_scalar_flags(tensors) is None or set(map(_DTYPE, tensors)) != {dtype}:
        return None
    bad = next((i for i, t in enumerate(tensors) if not inside_storage((t,))), None)
    if bad is None:
        return None  # only a NULL address is left, which lies outside any storage
    kind, which = ("step count", bad) if bad < n else ("product of coefficients", bad - n)
    raise RuntimeError(
        f"AM-AdamW's {kind} of tensor {which} of this call lies outside its storage (freed or shrunk under it, "
        "e.g. untyped_storage().resize_()): give the state a materialised tensor. Nothing was changed."
    )


def store_scalars(destinations: Sequence[torch.Tensor], values: torch.Tensor, adds: Sequence[bool]) -> bool:
    """Store ``values[i]`` (float64) in the one-element tensor ``destinations[i]``, rounded once to its
    dtype, or, where ``adds[i]``, the value it holds plus ``values[i]`` (added in float64): what
    ``torch._foreach_copy_(destinations, formed values)`` does, in one C call.  Every value is formed
    before anything is stored.  ``values`` is overwritten (scratch).  Returns False, having done nothing,
    where a destination is not a plain one-element float32/float64 CPU tensor inside its storage or the
    library is unavailable: the caller then runs the torch ops."""
    n = len(destinations)
    if not (isinstance(values, torch.Tensor) and values.dtype == torch.float64 and values.device.type == "cpu"
            and values.dim() == 1 and values.is_contiguous() and values.numel() == n and len(adds) == n):  # fmt: skip
        raise ValueError(f"store_scalars: needs a contiguous 1-D float64 CPU tensor of {n} values and {n} add flags, "
                         f"got {_what(values)} and {len(adds)} flags")
    arrays = _scalar_arrays(destinations)
    lib = library() if arrays is not None else None
    if lib is None:
        return False
    status = lib.am_store_scalars(n, arrays.addresses, arrays.flags, _array(ctypes.c_ubyte, tuple(adds)), values.data_ptr())
    if status != 0:
        raise RuntimeError(f"hf_am CPU kernel am_store_scalars refused its arguments (status {status}); nothing was changed")
    mark_written(destinations)
    return True


def step_coefficients(sums: torch.Tensor, hyper: torch.Tensor, has_threshold: bool, loss_delta: Optional[torch.Tensor]):
    """The closed form and restart rule per scope in one C call: ``(adaptive, reported, applied, restart,
    fallback)``, each ``(n_scopes,)`` float64, the bits of :func:`hf_am.coefficient.step_coefficients`.

    ``sums``: the ``(n_scopes, 3)`` float64 CPU sums ``[A, B, C]``; ``hyper``: ``(4, 1)`` or
    ``(4, n_scopes)`` float64 rows ``lam, beta_min, beta_max, restart threshold`` (NaN: no Restart
    variant in that scope); ``loss_delta``: ``None`` or a one-element float64 CPU tensor.  Everything is
    checked here, before the C code reads it.
    """
    n = sums.shape[0] if _is_double(sums) and sums.dim() == 2 else -1
    _require_double("sums", sums, n >= 0 and sums.shape[1] == 3, "a contiguous (n, 3) float64 CPU tensor")
    hyper_fits = _is_double(hyper) and hyper.dim() == 2 and hyper.shape[0] == 4 and hyper.shape[1] in (1, n)
    _require_double("hyper", hyper, hyper_fits, f"a contiguous (4, 1) or (4, {n}) float64 CPU tensor")
    delta_ptr = None
    if loss_delta is not None:
        delta_fits = _is_double(loss_delta, contiguous=False) and loss_delta.numel() == 1
        _require_double("loss_delta", loss_delta, delta_fits, "None or a one-element float64 CPU tensor")
        loss_delta = loss_delta.reshape(1).contiguous()
        delta_ptr = loss_delta.data_ptr()
    lib = library()
    if lib is None:
        raise RuntimeError(f"the CPU kernels are unavailable ({build_error()})")
    out = torch.empty(5, n, dtype=torch.float64)
    status = lib.am_coefficients(n, sums.data_ptr(), hyper.data_ptr(), hyper.shape[1], int(bool(has_threshold)), delta_ptr, out.data_ptr())
    if status != 0:
        raise RuntimeError(f"hf_am CPU kernel am_coefficients refused its arguments (status {status})")
    return out.unbind(0)


def _is_double(value, contiguous: bool = True) -> bool:
    """A float64 CPU tensor (contiguous unless told otherwise): what the C code may read as doubles."""
    return (isinstance(value, torch.Tensor) and value.dtype == torch.float64 and value.device.type == "cpu"
            and (not contiguous or value.is_contiguous()))  # fmt: skip


def _require_double(name: str, value, fits: bool, expected: str) -> None:
    if not fits:
        raise ValueError(f"step_coefficients: {name} must be {expected}, got {_what(value)}")


def _what(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}, {value.dtype}, on {value.device}, {'' if value.is_contiguous() else 'not '}contiguous"
    return type(value).__name__
