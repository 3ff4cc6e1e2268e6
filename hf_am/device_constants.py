"""Small tensors every step needs on the parameters' device, built once and reused.

Index tables, per-scope hyperparameters and fingerprints do not change between
steps; building them anew would copy host data to the device every step.  The
one mutable entry kind, :meth:`DeviceConstants.staging`, is scratch whose views
are what does not change.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, List, Tuple

import torch

_LIMIT = 256  # entries; gradients of ZeRO-3 sub-groups etc. may make many distinct keys


class DeviceConstants:
    """A bounded cache of device tensors keyed by what they were built from."""

    def __init__(self):
        self._entries: Dict[Hashable, Any] = {}

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        hit = self._entries.get(key)
        if hit is None:
            if len(self._entries) > _LIMIT:
                self._entries.clear()
            hit = self._entries[key] = build()
        return hit

    def staging(self, n: int, dtype: torch.dtype, device) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """A reused 1-D scratch tensor of ``n`` elements and the list of its ``n`` one-element views.

        For handing many values to a foreach op over 0-d destinations: the values change every step,
        the views need not (building ``n`` views costs ~0.4 us each on CPU, more than the copy they
        feed).  Copying into the scratch and reading it happen in stream order, so the next step may
        reuse it.
        """

        def build():
            buffer = torch.empty(n, dtype=dtype, device=device)
            return buffer, list(buffer.unbind(0))

        return self.get(("staging", device, dtype, n), build)

    def index(self, ids: List[int], device) -> torch.Tensor:
        """``ids`` as a ``long`` tensor on ``device``."""
        return self.get(("index", device, tuple(ids)), lambda: torch.tensor(ids, dtype=torch.long, device=device))

    def vector(self, values: Tuple[float, ...], device) -> torch.Tensor:
        """``values`` as a float64 vector on ``device`` (per-tensor hyperparameters of merged groups).

        Built once per values and device, as :meth:`index`: a plain (synchronising) copy the first time,
        not a non-blocking one from pinned memory, because a first build inside a CUDA-graph capture
        must fail loudly rather than leave the graph copying from a host buffer that is freed after it."""
        return self.get(("vector", device, values), lambda: torch.tensor(values, dtype=torch.float64, device=device))
