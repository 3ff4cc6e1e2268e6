"""Build, cache and call the fused CPU kernels (``csrc/am_cpu_kernels.c``).

The kernels are plain C compiled on first use with the system C compiler (about
a second), cached under ``$HF_AM_CACHE`` (default ``~/.cache/hf_am``) keyed by
the source, compiler and flags, and loaded with :mod:`ctypes`.  They cover
contiguous float32/float64 CPU tensors, the case where torch's per-op dispatch
makes the multi-tensor path slow (CPU training, DeepSpeed ZeRO-Offload).

Without a compiler, or with ``HF_AM_CPU_KERNELS=0``, :func:`library` returns
``None`` and the optimizers take the multi-tensor path.  The compiler is
``$HF_AM_CC``, else ``$CC``, else the first of ``cc``, ``gcc``, ``clang``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "am_cpu_kernels.c"
FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno", "-pthread"]

_lock = threading.Lock()
_state = {"tried": False, "lib": None, "error": None}


def compiler() -> Optional[str]:
    for candidate in (os.environ.get("HF_AM_CC"), os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate:
            path = shutil.which(candidate)
            if path:
                return path
            if candidate == os.environ.get("HF_AM_CC"):
                return candidate  # an explicit choice that does not exist: let the build report it
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("HF_AM_CACHE") or Path.home() / ".cache" / "hf_am") / "kernels"


def build_error() -> Optional[str]:
    """Why the kernels are unavailable (after :func:`library` returned ``None``)."""
    return _state["error"]


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel library, building it on first use; ``None`` when unavailable."""
    if _state["tried"]:
        return _state["lib"]
    with _lock:
        if not _state["tried"]:
            try:
                _state["lib"] = _load()
            except Exception as exc:  # no compiler, read-only cache, ... : fall back, say why once
                _state["error"] = f"{type(exc).__name__}: {exc}"
                warnings.warn(
                    f"hf_am: fused CPU kernels unavailable ({_state['error']}); using the multi-tensor path",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _state["tried"] = True
    return _state["lib"]


def _load() -> Optional[ctypes.CDLL]:
    if os.environ.get("HF_AM_CPU_KERNELS", "1") == "0":
        raise RuntimeError("disabled by HF_AM_CPU_KERNELS=0")
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set HF_AM_CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(
        b"\0".join([SOURCE.read_bytes(), cc.encode(), version.encode(), " ".join(FLAGS).encode(), platform.machine().encode()])
    ).hexdigest()[:16]
    target = cache_dir() / f"am_cpu_kernels-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.stem}.{os.getpid()}.{threading.get_ident()}.tmp.so")
        proc = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(tmp), "-lm"], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: ranks building at once each install a complete file
    lib = ctypes.CDLL(str(target))
    i64, ptr, dbl = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
    head = [ctypes.c_int, ctypes.c_int, i64, ptr]  # dtype bits, threads, n, numel
    lib.am_adamw_sums.argtypes = head + [ptr, ptr, ptr, dbl, ptr, ptr, ptr]
    lib.am_adamw_update.argtypes = head + [ptr, ptr, ptr, ptr, dbl, ptr, ptr, ptr, ptr, ptr]
    lib.am_sgd_sums.argtypes = head + [ptr, ptr, ptr, dbl, ptr]
    lib.am_sgd_update.argtypes = head + [ptr, ptr, ptr, dbl, ptr, ptr]
    for fn in (lib.am_adamw_sums, lib.am_adamw_update, lib.am_sgd_sums, lib.am_sgd_update):
        fn.restype = ctypes.c_int
    return lib


def tensor_problem(lists, dtypes: tuple, device_type: str) -> Optional[str]:
    """What keeps compiled kernels (C here, Triton on CUDA) off these parallel tensor lists, or ``None``.

    They need one dtype out of ``dtypes``, one device of ``device_type`` and contiguous tensors.
    """
    tensors = [t for lst in lists for t in lst]
    if not tensors:
        return "no tensors"
    dtype, device = tensors[0].dtype, tensors[0].device
    if dtype not in dtypes:
        return f"dtype {dtype} (the kernels take {', '.join(str(d).replace('torch.', '') for d in dtypes)})"
    for t in tensors:
        if t.device != device or t.device.type != device_type:
            return f"a tensor on {t.device} (the kernels run on one {device_type} device)"
        if t.dtype != dtype:
            return f"mixed dtypes {dtype} and {t.dtype}"
        if not t.is_contiguous():
            return "a non-contiguous tensor"
    return None


def unsupported_reason(lists: Sequence[Sequence[torch.Tensor]]) -> Optional[str]:
    """Why the kernels cannot run on these parallel tensor lists, or ``None`` when they can."""
    return tensor_problem(lists, (torch.float32, torch.float64), "cpu")


class _Call:
    """ctypes arguments for parallel tensor lists, kept alive for the duration of a call."""

    def __init__(self, first: Sequence[torch.Tensor]):
        self.n = len(first)
        self.bits = 64 if first[0].dtype == torch.float64 else 32
        self.numel = (ctypes.c_int64 * self.n)(*[t.numel() for t in first])
        self.keep: List[object] = []

    def pointers(self, tensors: Sequence[torch.Tensor]):
        arr = (ctypes.c_void_p * self.n)(*[t.data_ptr() for t in tensors])
        self.keep.append(arr)
        return arr

    def doubles(self, values: Optional[torch.Tensor]):
        """Per-tensor scalars as a contiguous float64 CPU tensor's address (None: NULL)."""
        if values is None:
            return None
        values = values.detach().to(device="cpu", dtype=torch.float64).reshape(-1).contiguous()
        if values.numel() != self.n:
            values = values.expand(self.n).contiguous()
        self.keep.append(values)
        return values.data_ptr()


def _check(status: int, name: str) -> None:
    if status != 0:
        raise RuntimeError(f"hf_am CPU kernel {name} failed (status {status}: could not start threads)")


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
