"""How the taps' grids nest in the finest one when the deeper taps are resized by nearest neighbour:
each cell of a deeper tap then covers a square block of finest positions, so its features (and
every statistic of them) are the same across that block and can be kept once per cell."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Level:
    """One tap of one scale: its kept channels, its own (h, w) grid, and how many finest positions
    one of its cells spans along each axis."""

    channels: int
    grid: tuple[int, int]
    ratio: int

    @property
    def cells(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class ScaleLayout:
    """The taps of one scale, deepest first (the embedding's channel order), the last the finest."""

    levels: tuple[Level, ...]

    @property
    def positions(self) -> int:
        """Finest positions of this scale."""
        return self.levels[-1].cells

    def rows(self, level: int, top_rows: slice) -> slice:
        """The cells (row-major) of ``level`` under the rows ``top_rows`` of the deepest tap's grid."""
        per = self.levels[0].ratio // self.levels[level].ratio * self.levels[level].grid[1]
        return slice(top_rows.start * per, top_rows.stop * per)

    def cell_of(self, level: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) on ``level``'s grid of the cells holding finest ``positions`` (row-major)."""
        r, width = self.levels[level].ratio, self.levels[-1].grid[1]
        return positions // width // r, positions % width // r

    def under(self, i: int, j: int, row: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For cells (row, col) of tap i, the row-major index of the cell of tap j <= i that holds
        each, and each one's row-major place among the t x t cells of tap i under it."""
        t = self.step(i, j)
        return row // t * self.levels[j].grid[1] + col // t, row % t * t + col % t

    def step(self, i: int, j: int) -> int:
        """Cells of tap i along each axis of one cell of tap j <= i."""
        return self.levels[j].ratio // self.levels[i].ratio

    def first(self, level: int) -> torch.Tensor:
        """The finest position (row-major) at the top-left of each cell of ``level``, row by row."""
        (h, w), r, width = self.levels[level].grid, self.levels[level].ratio, self.levels[-1].grid[1]
        return ((torch.arange(h) * r)[:, None] * width + torch.arange(w) * r).flatten()


def scale_layout(channels: list[int], grids: list[tuple[int, int]]) -> ScaleLayout | None:
    """The layout of taps with ``channels`` kept channels on ``grids``, both deepest first, the last
    the finest; None unless every tap keeps a channel and each grid is an integer multiple (the same
    on both axes) of the one above it, so that nearest resizing copies each cell into a block."""
    if any(c == 0 for c in channels):
        return None
    for (h0, w0), (h1, w1) in zip(grids, grids[1:], strict=False):
        if h1 % h0 or w1 % w0 or h1 // h0 != w1 // w0:
            return None
    fine = grids[-1][0]
    return ScaleLayout(tuple(Level(c, g, fine // g[0]) for c, g in zip(channels, grids, strict=True)))


def trivial_layout(channels: list[int], grid: tuple[int, int]) -> ScaleLayout:
    """Every tap (``channels`` kept of each, deepest first) at every position of ``grid``: one cell
    per position, the layout of any embedding."""
    return ScaleLayout(tuple(Level(c, (int(grid[0]), int(grid[1])), 1) for c in channels if c))
