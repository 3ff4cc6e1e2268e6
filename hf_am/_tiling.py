"""Cut tensor lists into cache-sized tiles for the multi-tensor path on CPU.

A step runs a dozen elementwise passes (preconditioner, weighted sums, update).
On a GPU each pass streams memory at full speed; on a CPU a pass over a
100 MB tensor spills every temporary to DRAM.  Running all passes tile by tile
keeps the temporaries in cache, which is what makes AM-AdamW's extra passes
nearly free on CPU.  On other devices everything is one tile.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

#: Elements per tile on CPU: small enough that a tile's temporaries stay in cache,
#: large enough that Python overhead per tile is negligible.
CPU_TILE_ELEMENTS = 1 << 18

Piece = Tuple[int, Optional[int], Optional[int]]  # (tensor index, start, end); None = whole tensor


def tile_elements_for(tensors: Sequence[torch.Tensor]) -> Optional[int]:
    """``None`` (one tile) unless every tensor lives on the CPU."""
    if tensors and all(t.device.type == "cpu" for t in tensors):
        return CPU_TILE_ELEMENTS
    return None


def plan_tiles(lists: Sequence[Sequence[torch.Tensor]]) -> List[List[Piece]]:
    """Group (pieces of) tensors into tiles of about ``CPU_TILE_ELEMENTS`` elements.

    ``lists`` are parallel lists (parameters, gradients, states) of equal shapes.
    Large tensors are split into flat slices where every list's tensor is
    contiguous; small ones are packed together; off the CPU there is one tile.
    """
    tensors = lists[0]
    tile_elements = tile_elements_for([t for lst in lists for t in lst])
    if tile_elements is None:
        return [[(i, None, None) for i in range(len(tensors))]]
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


def views(tensors: Sequence[torch.Tensor], tile: List[Piece]) -> List[torch.Tensor]:
    """The tile's pieces of ``tensors`` (views that share storage)."""
    out = []
    for i, start, end in tile:
        t = tensors[i]
        out.append(t if start is None else t.view(-1)[start:end])
    return out


def is_whole(tiles: List[List[Piece]], n: int) -> bool:
    """True when the plan is the single tile of whole tensors ``0..n-1``."""
    return len(tiles) == 1 and len(tiles[0]) == n and all(s is None for _, s, _ in tiles[0])
