"""Small tensors every step needs on the parameters' device, built once and reused.

Index tables, per-scope hyperparameters and fingerprints do not change between
steps; building them anew would copy host data to the device every step.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, List

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

    def index(self, ids: List[int], device) -> torch.Tensor:
        """``ids`` as a ``long`` tensor on ``device``."""
        return self.get(("index", device, tuple(ids)), lambda: torch.tensor(ids, dtype=torch.long, device=device))
