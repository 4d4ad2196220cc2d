"""How per-cell tensors map to finest positions, for embeddings in a block layout
(:mod:`padim.backbones.layout`): the helpers the statistics, the factorization and the distances
share.

Channels run deepest tap first. Under nearest tap resizing, write the embedding at a finest position
as the taps' parts x_0 (deepest), ..., x_L (finest), each constant over the cell of its tap that
holds the position. Then the (i, j) block of the sum of x x^T, for j <= i, is the same across a
cell of tap i, and so are the rows of tap i of the whitening factor W = L^-1 (cov = L L^T), which
involve only taps <= i: each is computed and kept once per cell of its tap. The trivial layout
(every tap at ratio 1) is the same computation position by position, for any embedding.

Tap embeddings are (cells, B, C) per tap, cells row by row. A block (i, j) of a sum over pairs of
taps is kept per tap-j cell with the t x t tap-i cells under it side by side, (cells_j, t t C_i,
C_j). Work runs a few rows of the deepest tap's grid at a time, so that the rows beneath of every
tap are one slice.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..backbones.layout import ScaleLayout

Blocks = list[list[torch.Tensor]]  # per scale, per tap (deepest first): (cells, B, channels)


def position_chunks(positions: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` of ``positions`` positions."""
    for start in range(0, positions, size):
        yield slice(start, min(start + size, positions))


def row_steps(layout: ScaleLayout, top_cells: int) -> Iterator[list[slice]]:
    """For runs of about ``top_cells`` deepest cells (whole rows), the cells of every tap beneath."""
    height, width = layout.levels[0].grid
    rows = max(1, round(top_cells / width))
    for start in range(0, height, rows):
        top = slice(start, min(start + rows, height))
        yield [layout.rows(i, top) for i in range(len(layout.levels))]


def tap_channels(layout: ScaleLayout) -> list[slice]:
    """Each tap's channels in the embedding."""
    out, start = [], 0
    for level in layout.levels:
        out.append(slice(start, start + level.channels))
        start += level.channels
    return out


def side_by_side(x: torch.Tensor, layout: ScaleLayout, i: int, j: int) -> torch.Tensor:
    """(n_i, B, C_i) values of tap-i cells -> a (rows_j, w_j, B, t, t, C_i) view, grouped under the
    tap-j cells holding them (``x`` whole rows of tap j's w_j cells)."""
    t, width = layout.step(i, j), layout.levels[j].grid[1]
    return x.view(-1, t, width, t, *x.shape[1:]).permute(0, 2, 4, 1, 3, 5)


def grouped(x: torch.Tensor, layout: ScaleLayout, i: int, j: int) -> torch.Tensor:
    """(tap-i cells, C) values of whole rows -> (tap-j cells, t t C): the t x t tap-i cells under
    each tap-j cell side by side, in the order of the pair sums and the cell weights."""
    t, w = layout.step(i, j), layout.levels[j].grid[1]
    return x.reshape(-1, t, w, t, x.shape[-1]).permute(0, 2, 1, 3, 4).reshape(-1, t * t * x.shape[-1])


def ungrouped(x: torch.Tensor, layout: ScaleLayout, i: int, j: int) -> torch.Tensor:
    """(tap-j cells, t t C_i, C) blocks of whole rows -> (tap-i cells, C_i, C), row by row: the
    inverse of :func:`grouped`'s order, a block per tap-i cell."""
    t, w, c = layout.step(i, j), layout.levels[j].grid[1], layout.levels[i].channels
    return x.reshape(-1, w, t, t, c, x.shape[-1]).permute(0, 2, 1, 3, 4, 5).reshape(-1, c, x.shape[-1])


def spread(x: torch.Tensor, layout: ScaleLayout, i: int, j: int) -> torch.Tensor:
    """(tap-j cells, ...) values of whole rows -> (tap-i cells, ...): each repeated over the t x t
    tap-i cells under it, row by row."""
    t, w = layout.step(i, j), layout.levels[j].grid[1]
    rest = x.shape[1:]
    return (x.reshape(-1, 1, w, 1, *rest).expand(-1, t, w, t, *rest)
            .reshape(-1, *rest))


def scale_ranges(layouts: list[ScaleLayout], positions: slice) -> Iterator[tuple[int, ScaleLayout, slice, slice]]:
    """(scale, layout, rows of ``positions`` in the result, local positions of that scale) for every
    scale that ``positions`` (of all scales, concatenated) meets."""
    start = 0
    for s, layout in enumerate(layouts):
        lo, hi = max(positions.start, start), min(positions.stop, start + layout.positions)
        if lo < hi:
            yield s, layout, slice(lo - positions.start, hi - positions.start), slice(lo - start, hi - start)
        start += layout.positions


def full_slice(positions: slice, total: int) -> slice:
    """``positions`` with its start and stop resolved against ``total`` positions."""
    return slice(*positions.indices(total)[:2])


def vector_at(layout: ScaleLayout, vectors: torch.Tensor, i: int, fine: torch.Tensor) -> torch.Tensor:
    """Per-cell (cells_i, C_i) values of tap i at finest positions ``fine`` of its scale."""
    row, col = layout.cell_of(i, fine)
    return vectors[row * layout.levels[i].grid[1] + col].contiguous()


def block_at(layout: ScaleLayout, pairs: torch.Tensor, i: int, j: int, fine: torch.Tensor) -> torch.Tensor:
    """The (i, j) blocks (see the module doc) at finest positions ``fine``: (n, C_i, C_j)."""
    row, col = layout.cell_of(i, fine)
    above, sub = layout.under(i, j, row, col)
    return pairs.view(pairs.shape[0], -1, layout.levels[i].channels, pairs.shape[2])[above, sub]


def pair_positions(layout: ScaleLayout, i: int, j: int) -> torch.Tensor:
    """For each entry of an (i, j) block tensor (tap-j cells, then the t x t tap-i cells under
    each), the finest position at the top left of that tap-i cell."""
    t, (h, w), r = layout.step(i, j), layout.levels[j].grid, layout.levels[i].ratio
    width = layout.levels[-1].grid[1]
    rows = (torch.arange(h)[:, None, None, None] * t + torch.arange(t)[None, None, :, None]) * r
    cols = (torch.arange(w)[None, :, None, None] * t + torch.arange(t)[None, None, None, :]) * r
    return (rows * width + cols).flatten()


def expand_vectors(layouts: list[ScaleLayout], per_cell: Blocks, positions: slice) -> torch.Tensor:
    """Per-cell (cells, C_i) vectors of every tap -> float64 (p, d) at finest ``positions`` (of all scales)."""
    positions = full_slice(positions, sum(lay.positions for lay in layouts))
    d = sum(lv.channels for lv in layouts[0].levels)
    out = torch.empty(positions.stop - positions.start, d, dtype=torch.float64, device=per_cell[0][0].device)
    for s, layout, rows, local in scale_ranges(layouts, positions):
        fine = torch.arange(local.start, local.stop, device=out.device)
        for i, ri in enumerate(tap_channels(layout)):
            out[rows, ri] = vector_at(layout, per_cell[s][i], i, fine).double()
    return out


def expand_pairs(layouts: list[ScaleLayout], pairs: list[list[list[torch.Tensor]]], positions: slice,
                 ) -> torch.Tensor:
    """Per-cell pair blocks -> the symmetric float64 (p, d, d) matrices at finest ``positions``."""
    positions = full_slice(positions, sum(lay.positions for lay in layouts))
    d = sum(lv.channels for lv in layouts[0].levels)
    out = torch.empty(positions.stop - positions.start, d, d, dtype=torch.float64, device=pairs[0][0][0].device)
    for s, layout, rows, local in scale_ranges(layouts, positions):
        channels = tap_channels(layout)
        o = out[rows]
        fine = torch.arange(local.start, local.stop, device=out.device)
        for i in range(len(layout.levels)):
            for j in range(i + 1):
                block = block_at(layout, pairs[s][i][j], i, j, fine)
                o[:, channels[i], channels[j]] = block
                if j < i:
                    o[:, channels[j], channels[i]] = block.transpose(1, 2)
    return out
