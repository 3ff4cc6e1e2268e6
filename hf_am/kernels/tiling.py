"""Cut tensor lists into cache-sized tiles for the multi-tensor path on CPU.

A step runs a dozen elementwise passes (preconditioner, weighted sums, update).
On a GPU each pass streams memory at full speed through multi-tensor kernels;
on a CPU a pass over a 100 MB tensor spills every temporary to DRAM.  Running
all passes tile by tile keeps the temporaries in cache, which is what makes the
extra passes of AM-AdamW nearly free on CPU.  On other devices everything is one
tile and the optimizers use kernels suited to the device (``TilePlan.cpu``).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

#: Elements per tile on CPU: small enough that a tile's temporaries stay in cache,
#: large enough that Python overhead per tile is negligible.  ``None`` treats the
#: CPU like any other device (one tile, device kernels): tests use it to run the
#: device kernels on CPU.
CPU_TILE_ELEMENTS: Optional[int] = 1 << 18

Piece = Tuple[int, Optional[int], Optional[int]]  # (tensor index, start, end); None = whole tensor


def tile_elements_for(tensors: Sequence[torch.Tensor]) -> Optional[int]:
    """``None`` (one tile) unless every tensor lives on the CPU."""
    if CPU_TILE_ELEMENTS is not None and tensors and all(t.device.type == "cpu" for t in tensors):
        return CPU_TILE_ELEMENTS
    return None


class TilePlan:
    """The tiles of parallel tensor lists (parameters, gradients, states of equal shapes).

    On CPU (``cpu`` is True) large tensors are split into flat slices wherever
    every list's tensor is contiguous, and small ones are packed together; each
    tile holds consecutive tensor indices, each at most once.  Elsewhere there is
    one tile of whole tensors.
    """

    def __init__(self, lists: Sequence[Sequence[torch.Tensor]]):
        tensors = lists[0]
        self.n = len(tensors)
        tile_elements = tile_elements_for([t for lst in lists for t in lst])
        self.cpu = tile_elements is not None
        if tile_elements is None:
            self.tiles: List[List[Piece]] = [[(i, None, None) for i in range(self.n)]]
        else:
            self.tiles = _cut(lists, tile_elements)
        self.whole = len(self.tiles) == 1 and all(start is None for _, start, _ in self.tiles[0])

    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self):
        return iter(self.tiles)

    @staticmethod
    def views(tensors: Sequence[torch.Tensor], tile: List[Piece]) -> List[torch.Tensor]:
        """The tile's pieces of ``tensors`` (views that share storage)."""
        out = []
        for i, start, end in tile:
            t = tensors[i]
            out.append(t if start is None else t.view(-1)[start:end])
        return out

    def per_tensor(self, rows: torch.Tensor) -> torch.Tensor:
        """Sum the rows of all pieces (in tile order) into one row per tensor."""
        if self.whole:
            return rows
        owners = [i for tile in self.tiles for i, _, _ in tile]
        out = torch.zeros(self.n, *rows.shape[1:], dtype=rows.dtype, device=rows.device)
        return out.index_add_(0, torch.tensor(owners, device=rows.device), rows)


def _cut(lists: Sequence[Sequence[torch.Tensor]], tile_elements: int) -> List[List[Piece]]:
    tensors = lists[0]
    tiles: List[List[Piece]] = []
    current: List[Piece] = []
    filled = 0
    for i, t in enumerate(tensors):
        n = t.numel()
        if n <= tile_elements or not all(lst[i].is_contiguous() for lst in lists):
            if filled + n > tile_elements and current:
                tiles.append(current)
                current, filled = [], 0
            current.append((i, None, None))
            filled += n
            continue
        for start in range(0, n, tile_elements):
            end = min(start + tile_elements, n)
            if filled + (end - start) > tile_elements and current:
                tiles.append(current)
                current, filled = [], 0
            current.append((i, start, end))
            filled += end - start
    if current:
        tiles.append(current)
    return tiles
