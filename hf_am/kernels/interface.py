"""What a compiled kernel set provides, and how it declines tensors it cannot step.

A *kernel set* runs the two phases of a step (docs/algorithm.md §10) over all
tensors of one param group at once.  Two sets exist, each a module that
satisfies :class:`KernelSet`:

* :mod:`hf_am.kernels.cpu` -- plain C (``hf_am/csrc/am_cpu_kernels.c``), built
  and cached by :mod:`hf_am.kernels.cpu_build`; contiguous float32/float64 CPU tensors.
* :mod:`hf_am.kernels.triton` -- Triton; contiguous float32/bfloat16/float16 CUDA tensors.

When every set declines a tensor list, the optimizers run the portable paths:
the multi-tensor path (:mod:`hf_am.multi_tensor`, which cuts CPU work into
cache-sized tiles with :mod:`hf_am.kernels.tiling`) or the per-tensor reference
(:mod:`hf_am.reference`).  :func:`hf_am.kernels.select_kernels` is the one place
that asks the sets.

Kernels never import the optimizer layer: they see tensor lists and scalars only.
"""

from __future__ import annotations

import operator
import threading
from collections import OrderedDict
from itertools import chain
from operator import attrgetter
from typing import Callable, Hashable, List, Optional, Protocol, Sequence, Tuple, TypeVar, runtime_checkable

import torch
from torch.autograd.graph import increment_version

TensorLists = Sequence[Sequence[torch.Tensor]]
T = TypeVar("T")


@runtime_checkable
class KernelSet(Protocol):
    """The contract of a compiled kernel set (both phases of both optimizers).

    Tensor arguments are parallel lists (one entry per parameter tensor of a
    group, equal shapes across lists).  Per-tensor scalars are 1-D tensors with
    one entry per tensor (or a number broadcast to all); ``keep=None`` means 1.
    Sums are returned as an ``(n_tensors, 3)`` tensor ``[<d,d>, <g,d>, <g-d,g-d>]``
    in the optimizer's metric (docs/algorithm.md §2, §6).  Phase 1 (``*_sums``)
    only reads; phase 2 (``*_update``) writes parameters and state in place and marks them written
    (:func:`mark_written`), as torch's in-place ops would.

    Optional (not part of the protocol): ``step_coefficients(sums, hyper, has_threshold,
    loss_delta)``, the coefficients of all scopes with the bits of
    :func:`hf_am.coefficient.step_coefficients` (the C set has it; where a set lacks it, the
    optimizer runs that definition).  ``adamw_scalars(steps, prods, beta2, eps, dtype)``, AM-AdamW's
    per-tensor counts, products and bias terms from the one-element state tensors in one call, or ``None``
    for tensors it does not take (the C set has it; elsewhere, and on ``None``, the torch definitions run).
    ``store_scalars(destinations, values, adds) -> bool``: one-element state stored (a copy, or a count plus
    its increment) in one call, what :func:`hf_am.statistics.record_step` does with torch's ops where a set
    lacks it or declines the tensors (the C set has it).
    """

    NAME: str

    def decline(self, lists: TensorLists, mirrored: bool = False) -> Optional[str]:
        """``None`` when the set can step these tensor lists, else why not (shown to users).  ``mirrored``:
        every later list is known to mirror the first (as :func:`tensor_problem` takes it)."""

    def adamw_sums(self, grads, exp_avgs, exp_avg_sqs, beta2: float, eps_scaled, d_scale) -> torch.Tensor:
        """Sums in the metric ``1/D'`` of this step's second moment ``v' = beta2 v + (1 - beta2) g^2``."""

    def adamw_update(self, params, grads, exp_avgs, exp_avg_sqs, beta2: float, eps_scaled, keep, weight, decay, step) -> None:
        """``v = v'; m = keep m; m += weight (g - m); p = decay p + step m / (sqrt(v') + eps')``."""

    def sgd_sums(self, grads, params, buffers, weight_decay: float) -> torch.Tensor:
        """Sums with the coupled-decay gradient ``g' = g + wd x``."""

    def sgd_update(self, params, grads, buffers, weight_decay: float, weight, step) -> None:
        """``d += weight (g' - d); x += step d``."""


def to_device(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A small host table (nested Python lists of numbers) as a tensor on ``device``, without
    synchronising: through pinned memory and a non-blocking copy, where a plain ``torch.tensor(...,
    device=cuda)`` copies from pageable memory and waits for the stream (and would stall a step).

    Refused while the current CUDA stream is being captured into a graph: the captured copy would read
    the host buffer again at every replay, after the buffer was freed and reused.  The kernels build
    their tables before any launch, so the step that raises has changed nothing."""
    host = torch.tensor(values, dtype=dtype)
    kind = torch.device(device).type
    if kind == "cpu":
        return host
    if kind == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "hf_am: the Triton kernels met tensors for the first time while a CUDA graph was being captured "
            "(a table of their pointers or sizes would be copied from host memory that the replays would "
            "read after it is freed). Run warm-up steps before capturing, with the same parameters, "
            "gradients (zero_grad(set_to_none=False) keeps them) and state, as torch's graph recipe does. "
            "Nothing was changed by this step."
        )
    if torch.cuda.is_available():
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def mark_written(*lists: Sequence[torch.Tensor]) -> None:
    """Tell autograd that compiled code wrote these tensors in place (their version counters move, as a
    torch in-place op moves them): a graph that saved a parameter before the step then refuses to
    backward through the changed value, as with torch's own optimizers, instead of computing with it."""
    increment_version([t for lst in lists for t in lst])


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill ``numel`` consecutive slots in some order
    (contiguous, ``channels_last``, a permuted tensor), so a kernel may walk the memory linearly."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and equal strides wherever a dimension has more than one element."""
    return a.shape == b.shape and all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n != 1)


_SHAPE, _DTYPE, _DEVICE = attrgetter("shape"), attrgetter("dtype"), attrgetter("device")


def _all_contiguous_alike(lists: TensorLists, tensors: Sequence[torch.Tensor], dtypes: tuple, device_type: str) -> bool:
    """One dtype out of ``dtypes`` and one ``device_type`` device for all, every tensor contiguous, equal
    lengths and equal shapes per index, read in C-level ``map`` loops: :func:`_first_problem` would find
    nothing (it runs when this is False)."""
    first = tensors[0]
    if first.dtype not in dtypes or first.device.type != device_type:
        return False
    if len(set(map(_DTYPE, tensors))) != 1 or len(set(map(_DEVICE, tensors))) != 1:
        return False
    if not all(map(torch.Tensor.is_contiguous, tensors)):
        return False
    shapes = list(map(_SHAPE, lists[0]))
    return all(list(map(_SHAPE, lst)) == shapes for lst in lists[1:])


_HELD = torch.UntypedStorage.nbytes
_OWN_BYTES, _ITEMSIZE = attrgetter("nbytes"), attrgetter("itemsize")


def byte_sizes(tensors: Sequence[torch.Tensor]) -> Tuple[List[int], List[int]]:
    """Each tensor's ``nbytes`` and ``itemsize``: :func:`inside_storage`'s optional arguments, the same for
    lists of one shape and dtype (a parameter's gradient and state), so a caller reads them once."""
    return list(map(_OWN_BYTES, tensors)), list(map(_ITEMSIZE, tensors))


def inside_storage(tensors: Sequence[torch.Tensor], own_bytes=None, itemsizes=None) -> bool:
    """True when every tensor is contiguous and all its bytes lie inside its storage, decided in bulk
    (C-level ``map`` loops, ~0.5 us a tensor on CPU); False for anything else, to be looked at one
    tensor at a time (:func:`hf_am.gate._storage_problem`, which also takes other layouts, strided views
    and empty tensors, and names the tensor).  A storage freed or shrunk under a tensor
    (``untyped_storage().resize_()``, as FSDP does to unsharded parameters) leaves its data pointer
    pointing at freed memory, which compiled code, and torch's own ops, would read.
    ``own_bytes``/``itemsizes``: the tensors' :func:`byte_sizes` where the caller has them."""
    try:
        if not all(map(torch.Tensor.is_contiguous, tensors)):
            return False
        offsets = list(map(torch.Tensor.storage_offset, tensors))
        own = own_bytes if own_bytes is not None else map(_OWN_BYTES, tensors)
        if any(offsets):  # views into a larger storage (flat buffers, DeepSpeed's partitions)
            own = map(operator.add, own, map(operator.mul, offsets, itemsizes if itemsizes is not None else map(_ITEMSIZE, tensors)))
        return all(map(operator.le, own, map(_HELD, map(torch.Tensor.untyped_storage, tensors))))
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, or a wrapper subclass without storage
        return False


class BoundedCache:
    """A thread-safe map of at most ``max_entries`` entries that forgets the least recently used first.

    For what the kernel layer derives from a step's tensors and would otherwise derive again next step
    (ctypes arrays of addresses, the verdicts of full checks): a training loop hands the same few lists
    every step, so a handful of entries covers it, and the bound keeps a process that builds many
    optimizers from growing the cache without end.  ``None`` is never stored (``get`` returns it for
    "absent").  Entries are dropped, never invalidated: a key must say everything its value depends on."""

    def __init__(self, max_entries: int):
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries!r}")
        self.max_entries = max_entries
        self._entries: "OrderedDict[Hashable, object]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable):
        """The value stored under ``key`` (now the most recently used), or ``None``."""
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: Hashable, value) -> None:
        """Store ``value`` (not ``None``) under ``key``, dropping the least recently used beyond the bound."""
        if value is None:
            raise ValueError("BoundedCache does not store None (get() returns None for an absent key)")
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


# What a full check found for a list of tensors, by the list's addresses: (the tensor objects, their dtypes,
# the result).  Holding the objects keeps their memory alive, so for the same objects at the same addresses
# with the same dtypes the check need not run again: a storage cannot shrink in place (resizing it
# reallocates, and freeing it leaves address 0 plus the offset), so every byte the check found inside a live
# allocation still is; the dtypes are compared, since `.data` can give an object another dtype at one
# address.  About 0.2 us a tensor, against ~0.7 us for the full checks of one-element state.
_REMEMBERED = BoundedCache(64)


def remembered_check(kind: str, tensors: Sequence[torch.Tensor], check: Callable[[Sequence[torch.Tensor], tuple, tuple], T],
                     dtypes_matter: bool = True) -> T:
    """``check(tensors, addresses, dtypes)``, or what it returned for these objects at these addresses with
    these dtypes before (a result that is ``None`` or False is not remembered; ``None`` also where an entry
    has no address: a tensor without a storage, or no tensor).  ``kind`` keeps the results
    of different checks apart.  For checks of what the tensors' memory is (extent, dtype, layout) that hold
    for as long as an object keeps its address and dtype: see the note on ``_REMEMBERED``.
    ``dtypes_matter=False`` for a check of the extent alone (``dtypes`` is then ``None``): a tensor is made
    inside its storage (torch checks every view it builds), so only a changed address can move it out."""
    try:
        addresses = tuple(map(torch.Tensor.data_ptr, tensors))
        dtypes = tuple(map(_DTYPE, tensors)) if dtypes_matter else None
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):  # no storage (a wrapper subclass), no tensor
        return None
    key = (kind, addresses)
    seen = _REMEMBERED.get(key)
    if seen is not None and seen[1] == dtypes and all(map(operator.is_, seen[0], tensors)):
        return seen[2]
    result = check(tensors, addresses, dtypes)
    if result is not None and result is not False:
        _REMEMBERED.put(key, (tuple(tensors), dtypes, result))
    return result


def tensor_problem(lists: TensorLists, dtypes: tuple, device_type: str, mirrored: bool = False) -> Optional[str]:
    """What keeps a kernel set off these parallel tensor lists, or ``None``.

    Kernels walk raw memory with one element count per parameter, so every tensor
    of a parameter (parameter, gradient, each state tensor) must have one dtype out
    of ``dtypes``, live on one device of ``device_type``, and share one dense memory
    layout (contiguous, or e.g. ``channels_last`` in all of them).  Each set's
    :meth:`KernelSet.decline` starts with this check.  The common case is accepted in bulk; anything
    else goes to :func:`_first_problem`, the definition, which names the tensor
    (tests/unit/test_gate_bulk.py holds the two to each other).

    ``mirrored``: the caller has found every tensor of the later lists contiguous, of the length of the
    first list and of the shape, dtype and device of its entry there (the optimizer's gate, in bulk), so
    only the first list is looked at: the answer is the one all lists would give.
    """
    if mirrored:
        lists = lists[:1]
    tensors = list(chain.from_iterable(lists))
    if not tensors:
        return "no tensors"
    if _all_contiguous_alike(lists, tensors, dtypes, device_type):
        return None  # the common case in bulk
    return _first_problem(lists, tensors, dtypes, device_type)


def _first_problem(lists: TensorLists, tensors: Sequence[torch.Tensor], dtypes: tuple, device_type: str) -> Optional[str]:
    """:func:`tensor_problem`'s definition, tensor by tensor: the first thing that keeps the kernels off."""
    dtype, device = tensors[0].dtype, tensors[0].device
    if dtype not in dtypes:
        return f"dtype {dtype} (the kernels take {', '.join(str(d).replace('torch.', '') for d in dtypes)})"
    if device.type != device_type:
        return f"a tensor on {device} (the kernels run on one {device_type} device)"
    for t in tensors:
        if t.device != device:
            return f"a tensor on {t.device} (the kernels run on one {device_type} device)"
        if t.dtype != dtype:
            return f"mixed dtypes {dtype} and {t.dtype}"
    if any(len(lst) != len(lists[0]) for lst in lists[1:]):
        return "tensor lists of different lengths"
    for i, first in enumerate(lists[0]):
        first_contiguous = first.is_contiguous()
        if not first_contiguous and not is_dense(first):
            return f"tensor {i} is a strided view, not dense in memory (shape {tuple(first.shape)}, strides {first.stride()})"
        shape = first.shape
        for lst in lists[1:]:
            other = lst[i]
            # the common case, cheaply: two contiguous tensors of one shape share one layout
            if first_contiguous and other.shape == shape and other.is_contiguous():
                continue
            if not _same_layout(first, other):
                return (
                    f"tensor {i}: a parameter and its gradient or state differ in shape or memory layout "
                    f"({tuple(first.shape)} strides {first.stride()} vs {tuple(lst[i].shape)} strides {lst[i].stride()})"
                )
    return None
