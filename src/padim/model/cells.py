"""Statistics and Mahalanobis distances cell by cell, for embeddings with a block layout
(:mod:`padim.backbones.layout`, nearest tap resizing): the same numbers as position by position,
with each deep tap's share computed once per cell of that tap instead of once per finest position.

Channels run deepest tap first. At a finest position, write the embedding as the taps' parts x_0
(deepest), ..., x_L (finest), each constant over the cell of its tap that holds the position. Then
the (i, j) block of the sum of x x^T, for j <= i, is the same across a cell of tap i; and so are the
rows of tap i of the whitening factor W = L^-1 (cov = L L^T), which involve only taps <= i. The
squared distance |W (x - mean)|^2 is the sum over taps i of |sum_j W_ij x_j - W_i mean|^2, each
term computed once per cell of tap i and added to all finest positions under it.

Tap embeddings are (cells, B, C) per tap, cells row by row (FeatureExtractor.blocks). Work runs a
few rows of the deepest tap's grid at a time, so that the rows beneath of every tap are one slice.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..backbones.layout import ScaleLayout
from .stats import GaussianStats, check_finite, sums_covariance

Blocks = list[list[torch.Tensor]]  # per scale, per tap (deepest first): (cells, B, channels)
STATS_TOP_CELLS = 16  # deepest cells per step of an update (fewer: smaller products, run slower)


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


def _grouped(x: torch.Tensor, layout: ScaleLayout, i: int, j: int) -> torch.Tensor:
    """(tap-i cells, C) values, row by row -> (tap-j cells, t t C): the t x t tap-i cells under each
    tap-j cell side by side, in the order of BlockStats' sums and BlockWhitening's weights."""
    t, (h, w) = layout.step(i, j), layout.levels[j].grid
    return x.reshape(h, t, w, t, -1).permute(0, 2, 1, 3, 4).reshape(h * w, -1)


def _expand_vectors(layouts: list[ScaleLayout], per_cell: list[list[torch.Tensor]], positions: slice,
                    ) -> torch.Tensor:
    """Per-cell (cells, C_i) vectors of every tap -> float64 (p, d) at finest ``positions`` (of all scales)."""
    positions = slice(*positions.indices(sum(lay.positions for lay in layouts))[:2])
    d = sum(lv.channels for lv in layouts[0].levels)
    out = torch.empty(positions.stop - positions.start, d, dtype=torch.float64, device=per_cell[0][0].device)
    for s, layout, rows, local in scale_ranges(layouts, positions):
        fine = torch.arange(local.start, local.stop, device=out.device)
        for i, (level, ri) in enumerate(zip(layout.levels, tap_channels(layout), strict=True)):
            row, col = layout.cell_of(i, fine)
            out[rows, ri] = per_cell[s][i][row * level.grid[1] + col].double()
    return out


def _expand_outer(layouts: list[ScaleLayout], cross: list[list[list[torch.Tensor]]], positions: slice,
                  ) -> torch.Tensor:
    """Per-cell sums of outer products (BlockStats' layout) -> float64 (p, d, d) at finest ``positions``."""
    positions = slice(*positions.indices(sum(lay.positions for lay in layouts))[:2])
    d = sum(lv.channels for lv in layouts[0].levels)
    outer = torch.empty(positions.stop - positions.start, d, d, dtype=torch.float64, device=cross[0][0][0].device)
    for s, layout, rows, local in scale_ranges(layouts, positions):
        channels = tap_channels(layout)
        o = outer[rows]
        fine = torch.arange(local.start, local.stop, device=outer.device)
        for i, level in enumerate(layout.levels):
            row, col = layout.cell_of(i, fine)
            ri = channels[i]
            for j in range(i + 1):
                c = cross[s][i][j]
                above, sub = layout.under(i, j, row, col)
                block = c.view(c.shape[0], -1, level.channels, c.shape[2])[above, sub]
                o[:, ri, channels[j]] = block
                if j < i:
                    o[:, channels[j], ri] = block.transpose(1, 2)
    return outer


def scale_ranges(layouts: list[ScaleLayout], positions: slice) -> Iterator[tuple[int, ScaleLayout, slice, slice]]:
    """(scale, layout, rows of ``positions`` in the result, local positions of that scale) for every
    scale that ``positions`` (of all scales, concatenated) meets."""
    start = 0
    for s, layout in enumerate(layouts):
        lo, hi = max(positions.start, start), min(positions.stop, start + layout.positions)
        if lo < hi:
            yield s, layout, slice(lo - positions.start, hi - positions.start), slice(lo - start, hi - start)
        start += layout.positions


class BlockStats:
    """Streaming Gaussian statistics of block-layout embeddings, cell by cell (like StreamingStats:
    float32 sums of x minus the first batch's mean, turned into float64 sums by :meth:`stats`).
    For MobileNetV2 at d = 152 an update does about a third of StreamingStats' work and the sums
    take about a quarter of its memory. A fit in one process uses them as they are (:meth:`mean`,
    :meth:`covariance`, a few positions at a time), so the float64 sums, twice their size, are made
    only to be merged."""

    def __init__(self, layouts: list[ScaleLayout], device: torch.device | str = "cpu"):
        self.layouts = layouts
        self.count = 0
        self.shift: Blocks | None = None
        self.total = [[torch.zeros(lv.cells, lv.channels, dtype=torch.float64, device=device)
                       for lv in lay.levels] for lay in layouts]
        # cross[s][i][j], j <= i: per cell of tap j, the sums of (x_i - shift_i)(x_j - shift_j)^T of
        # the t x t tap-i cells under it, (t t C_i, C_j)
        self.cross = [[[torch.zeros(b.cells, lay.step(i, j) ** 2 * a.channels, b.channels, device=device)
                        for j, b in enumerate(lay.levels[:i + 1])] for i, a in enumerate(lay.levels)]
                      for lay in layouts]

    @property
    def positions(self) -> int:
        """Finest positions of all scales."""
        return sum(lay.positions for lay in self.layouts)

    @property
    def device(self) -> torch.device:
        """Where the sums are."""
        return self.total[0][0].device

    def mean(self) -> torch.Tensor:
        """(P, d) float64 sample mean: the shift plus the mean of x - shift."""
        if self.shift is None:
            raise ValueError("no samples accumulated")
        self._check_unconverted()
        return (_expand_vectors(self.layouts, self.shift, slice(None))
                + _expand_vectors(self.layouts, self.total, slice(None)) / self.count)

    def covariance(self, eps: float, estimator: str = "eps", positions: slice = slice(None)) -> torch.Tensor:
        """As :meth:`GaussianStats.covariance`, from the shifted sums of ``positions`` expanded (a
        covariance does not depend on the shift; with it, the float64 sums cancel fewer digits)."""
        self._check_unconverted()
        if self.count < 2:
            raise ValueError(f"need at least 2 training images for a covariance, got {self.count}")
        outer = _expand_outer(self.layouts, self.cross, positions)
        mean = _expand_vectors(self.layouts, self.total, positions) / self.count
        return sums_covariance(outer, mean, self.count, eps, estimator)

    def update(self, blocks: Blocks) -> None:
        """Add a batch of embeddings from FeatureExtractor.blocks."""
        self._check_unconverted()
        b = blocks[0][0].shape[1]
        if b == 0:
            return
        for x in (x for scale in blocks for x in scale):
            check_finite(x)
        if self.shift is None:
            self.shift = [[x.mean(dim=1) for x in scale] for scale in blocks]
        self.count += b
        for layout, xs, shifts, totals, cross in zip(self.layouts, blocks, self.shift, self.total, self.cross,
                                                     strict=True):
            # scratch blocks for all steps: fresh temporaries this large cost page faults
            steps = list(row_steps(layout, STATS_TOP_CELLS))
            scratch = [x.new_empty(steps[0][i].stop, b, x.shape[2]) for i, x in enumerate(xs)]
            grouped = [x.new_empty(steps[0][-1].stop * b * x.shape[2]) for x in xs]
            for parts in steps:
                c = [torch.sub(x[p], s[p].unsqueeze(1), out=buf[:p.stop - p.start])
                     for x, s, p, buf in zip(xs, shifts, parts, scratch, strict=True)]
                for i, ci in enumerate(c):
                    totals[i][parts[i]] += ci.sum(dim=1)
                    cross[i][i][parts[i]].baddbmm_(ci.transpose(1, 2), ci)
                    for j in range(i):  # one product per tap-j cell, its tap-i cells side by side
                        cells = side_by_side(ci, layout, i, j).permute(0, 1, 3, 4, 5, 2)
                        lhs = grouped[i][:ci.numel()].view(cells.shape).copy_(cells)
                        cross[i][j][parts[j]].baddbmm_(lhs.view(c[j].shape[0], -1, b), c[j])

    @torch.inference_mode()
    def stats(self, into: CellStats | None = None) -> CellStats:
        """The float64 sums of x and x x^T, still kept per cell (:class:`CellStats`); added into
        ``into`` (and that returned) if given. Call once: each float32 sum is freed as it is
        converted, so the float64 copy never coexists with all of them."""
        if self.shift is None:
            raise ValueError("no samples accumulated")
        self._check_unconverted()
        n = self.count
        total: list[list[torch.Tensor]] = []
        cross: list[list[list[torch.Tensor]]] = []
        for s, (layout, shifts, totals, crosses) in enumerate(
                zip(self.layouts, self.shift, self.total, self.cross, strict=True)):
            # with S = sum(x - s): sum x_i x_j^T = sum (x_i - s_i)(x_j - s_j)^T + u_i s_j^T + s_i u_j^T,
            # u = S + n s / 2 (as add_shift_terms, for each pair of taps)
            shift = [x.double() for x in shifts]
            u = [t + (n / 2) * x for t, x in zip(totals, shift, strict=True)]
            total.append([t.add_(x, alpha=n) for t, x in zip(totals, shift, strict=True)])
            cross.append([])
            for i in range(len(layout.levels)):
                row = []
                for j in range(i + 1):
                    out = crosses[i][j].double()
                    crosses[i][j] = None  # freed before the next one is converted
                    si, ui = (_grouped(x[i], layout, i, j) for x in (shift, u))
                    out.baddbmm_(ui.unsqueeze(2), shift[j].unsqueeze(1)).baddbmm_(si.unsqueeze(2), u[j].unsqueeze(1))
                    if into is not None:
                        into.cross[s][i][j] += out
                        del out
                    else:
                        row.append(out)
                cross[-1].append(row)
        self.cross = self.total = None  # freed; also marks the sums converted
        if into is None:
            return CellStats(self.layouts, n, total, cross)
        into.count += n
        for mine, theirs in zip(into.total, total, strict=True):
            for a, b in zip(mine, theirs, strict=True):
                a += b
        return into

    def _check_unconverted(self) -> None:
        if self.cross is None:
            raise ValueError("these statistics were converted by stats(), which frees the running sums")


class CellStats:
    """Float64 sums of block-layout embeddings, kept per cell (what :meth:`BlockStats.stats` gives):
    the count; per scale and tap i, ``total[s][i]`` (tap-i cells, C_i), the sums of x_i; for taps
    j <= i, ``cross[s][i][j]`` (tap-j cells, t t C_i, C_j), the sums of x_i x_j^T of the t x t
    tap-i cells under each tap-j cell. Like :class:`GaussianStats` they add up (``a + b``), and they
    give the per-position sums, covariances and mean a few positions at a time, so the (P, d, d)
    float64 statistics are never formed (for MobileNetV2 at d = 152 they take ~1/4 of its memory)."""

    def __init__(self, layouts: list[ScaleLayout], count: int, total: list[list[torch.Tensor]],
                 cross: list[list[list[torch.Tensor]]]):
        self.layouts = layouts
        self.count = count
        self.total = total
        self.cross = cross

    @property
    def positions(self) -> int:
        """Finest positions of all scales."""
        return sum(lay.positions for lay in self.layouts)

    @property
    def dim(self) -> int:
        """Channels d of the embedding."""
        return sum(lv.channels for lv in self.layouts[0].levels)

    @property
    def device(self) -> torch.device:
        """Where the sums are."""
        return self.total[0][0].device

    def __add__(self, other: CellStats) -> CellStats:
        if self.layouts != other.layouts:
            raise ValueError("cannot merge cell statistics of different layouts")
        return CellStats(self.layouts, self.count + other.count,
                         [[a + b for a, b in zip(x, y, strict=True)] for x, y in zip(self.total, other.total,
                                                                                    strict=True)],
                         [[[a + b for a, b in zip(xi, yi, strict=True)] for xi, yi in zip(x, y, strict=True)]
                          for x, y in zip(self.cross, other.cross, strict=True)])

    def sums(self, positions: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The float64 (p, d) sums of x and (p, d, d) sums of x x^T of ``positions`` (of all scales)."""
        return _expand_vectors(self.layouts, self.total, positions), _expand_outer(self.layouts, self.cross, positions)

    def mean(self) -> torch.Tensor:
        """(P, d) sample mean."""
        if self.count < 1:
            raise ValueError("no samples accumulated")
        return _expand_vectors(self.layouts, self.total, slice(None)) / self.count

    def covariance(self, eps: float, estimator: str = "eps", positions: slice = slice(None)) -> torch.Tensor:
        """As :meth:`GaussianStats.covariance`, from the sums of ``positions`` expanded."""
        if self.count < 2:
            raise ValueError(f"need at least 2 training images for a covariance, got {self.count}")
        total, outer = self.sums(positions)
        return sums_covariance(outer, total / self.count, self.count, eps, estimator)

    def expand(self) -> GaussianStats:
        """The per-position :class:`GaussianStats` (all (P, d, d) sums: for tests and small models)."""
        total, outer = self.sums(slice(0, self.positions))
        return GaussianStats(self.count, total, outer)

