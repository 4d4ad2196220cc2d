"""Statistics and Mahalanobis distances cell by cell, for embeddings with a block layout
(:mod:`padim.backbones.blocks`, nearest tap resizing): the same numbers as position by position,
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
from torch import nn

from ..backbones.blocks import ScaleLayout
from .stats import GaussianStats, add_shift_terms, check_finite, position_chunks

Blocks = list[list[torch.Tensor]]  # per scale, per tap (deepest first): (cells, B, channels)
STATS_TOP_CELLS = 16  # deepest cells per step of an update (fewer: smaller products, run slower)
DISTANCE_TOP_CELLS = 64  # deepest cells per step of the distances
EXPAND_CHUNK = 512  # finest positions per step when sums or factors are expanded per position


def _steps(layout: ScaleLayout, top_cells: int) -> Iterator[list[slice]]:
    """For runs of about ``top_cells`` deepest cells (whole rows), the cells of every tap beneath."""
    height, width = layout.levels[0].grid
    rows = max(1, round(top_cells / width))
    for start in range(0, height, rows):
        top = slice(start, min(start + rows, height))
        yield [layout.rows(i, top) for i in range(len(layout.levels))]


def _offsets(layout: ScaleLayout) -> list[slice]:
    """Each tap's channels in the embedding."""
    out, start = [], 0
    for level in layout.levels:
        out.append(slice(start, start + level.channels))
        start += level.channels
    return out


def _side_by_side(x: torch.Tensor, layout: ScaleLayout, i: int, j: int) -> torch.Tensor:
    """(n_i, B, C_i) values of tap-i cells -> a (rows_j, w_j, B, t, t, C_i) view, grouped under the
    tap-j cells holding them (``x`` whole rows of tap j's w_j cells)."""
    t, width = layout.step(i, j), layout.levels[j].grid[1]
    return x.view(-1, t, width, t, *x.shape[1:]).permute(0, 2, 4, 1, 3, 5)


def _scale_ranges(layouts: list[ScaleLayout], positions: slice) -> Iterator[tuple[int, ScaleLayout, slice, slice]]:
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
    For MobileNetV2 at d = 152 an update costs ~1/3 of StreamingStats' and the sums take ~1/4 of
    its memory."""

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
            steps = list(_steps(layout, STATS_TOP_CELLS))
            scratch = [x.new_empty(steps[0][i].stop, b, x.shape[2]) for i, x in enumerate(xs)]
            grouped = [x.new_empty(steps[0][-1].stop * b * x.shape[2]) for x in xs]
            for parts in steps:
                c = [torch.sub(x[p], s[p].unsqueeze(1), out=buf[:p.stop - p.start])
                     for x, s, p, buf in zip(xs, shifts, parts, scratch, strict=True)]
                for i, ci in enumerate(c):
                    totals[i][parts[i]] += ci.sum(dim=1)
                    cross[i][i][parts[i]].baddbmm_(ci.transpose(1, 2), ci)
                    for j in range(i):  # one product per tap-j cell, its tap-i cells side by side
                        cells = _side_by_side(ci, layout, i, j).permute(0, 1, 3, 4, 5, 2)
                        lhs = grouped[i][:ci.numel()].view(cells.shape).copy_(cells)
                        cross[i][j][parts[j]].baddbmm_(lhs.view(c[j].shape[0], -1, b), c[j])

    def stats(self) -> GaussianStats:
        """The float64 sums of x and x x^T of every finest position (all scales, row by row), as
        StreamingStats.stats gives them. Call once."""
        if self.shift is None:
            raise ValueError("no samples accumulated")
        self._check_unconverted()
        d = sum(lv.channels for lv in self.layouts[0].levels)
        positions = sum(lay.positions for lay in self.layouts)
        device = self.total[0][0].device
        outer = torch.empty(positions, d, d, dtype=torch.float64, device=device)
        total = torch.empty(positions, d, dtype=torch.float64, device=device)
        for (_, layout, rows, _), shifts, totals, cross in zip(
                _scale_ranges(self.layouts, slice(0, positions)), self.shift, self.total, self.cross, strict=True):
            channels = _offsets(layout)
            for part in position_chunks(layout.positions, EXPAND_CHUNK):
                at = slice(rows.start + part.start, rows.start + part.stop)
                o, t, s = outer[at], total[at], torch.empty_like(total[at])
                fine = torch.arange(part.start, part.stop, device=device)
                for i, level in enumerate(layout.levels):
                    row, col = layout.cell_of(i, fine)
                    cell, ri = row * level.grid[1] + col, channels[i]
                    s[:, ri] = shifts[i][cell]
                    t[:, ri] = totals[i][cell]
                    for j in range(i + 1):
                        above, sub = layout.under(i, j, row, col)
                        block = cross[i][j].view(cross[i][j].shape[0], -1, level.channels,
                                                 cross[i][j].shape[2])[above, sub]
                        o[:, ri, channels[j]] = block
                        if j < i:
                            o[:, channels[j], ri] = block.transpose(1, 2)
                add_shift_terms(o, s, t, self.count)
                t.add_(s, alpha=self.count)
        self.cross = self.total = None  # freed; also marks the sums converted
        return GaussianStats(self.count, total, outer)

    def _check_unconverted(self) -> None:
        if self.cross is None:
            raise ValueError("these statistics were converted by stats(), which frees the running sums")


class BlockWhitening(nn.Module):
    """The whitening factor W and W mean of block-layout embeddings, kept per cell: for each scale
    and taps j <= i, ``w{s}_{i}_{j}`` holds, per tap-j cell, W_ij^T of the t x t tap-i cells under
    it side by side, (C_j, t t C_i), so that one product per tap-j cell gives all of them;
    ``b{s}_{i}`` holds W_i mean per tap-i cell."""

    def __init__(self, layouts: list[ScaleLayout], device: torch.device | str = "cpu"):
        super().__init__()
        self.layouts = layouts
        for s, layout in enumerate(layouts):
            for i, a in enumerate(layout.levels):
                self.register_buffer(f"b{s}_{i}", torch.zeros(a.cells, a.channels, device=device))
                for j, b in enumerate(layout.levels[:i + 1]):
                    self.register_buffer(f"w{s}_{i}_{j}", torch.zeros(
                        b.cells, b.channels, layout.step(i, j) ** 2 * a.channels, device=device))

    def _weight(self, s: int, i: int, j: int) -> torch.Tensor:
        """``w{s}_{i}_{j}`` as (tap-j cells, C_j, t t, C_i)."""
        w = self.get_buffer(f"w{s}_{i}_{j}")
        return w.view(w.shape[0], w.shape[1], -1, self.layouts[s].levels[i].channels)

    def fill(self, positions: slice, factor: torch.Tensor, mean: torch.Tensor) -> None:
        """Take the rows of the (p, d, d) ``factor`` and (p, d) ``mean`` of ``positions`` (of all
        scales) at the top-left finest position of each cell; call for every position in turn."""
        for s, layout, rows, local in _scale_ranges(self.layouts, positions):
            channels = _offsets(layout)
            f, mu = factor[rows], mean[rows]
            fine = torch.arange(local.start, local.stop, device=f.device)
            for i, level in enumerate(layout.levels):
                row, col = layout.cell_of(i, fine)
                first = (fine // layout.levels[-1].grid[1] % level.ratio == 0) & (fine % level.ratio == 0)
                if not bool(first.any()):
                    continue
                row, col, end = row[first], col[first], channels[i].stop
                w = f[first][:, channels[i], :end].float()  # (n, C_i, channels of taps <= i)
                self.get_buffer(f"b{s}_{i}")[row * level.grid[1] + col] = torch.bmm(
                    w, mu[first][:, :end, None].float())[..., 0]
                for j in range(i + 1):
                    above, sub = layout.under(i, j, row, col)
                    self._weight(s, i, j)[above, :, sub] = w[:, :, channels[j]].transpose(1, 2)

    def factor_of(self, positions: slice, d: int) -> torch.Tensor:
        """The (p, d, d) whitening factor of ``positions`` (of all scales), rebuilt from the cells."""
        out = torch.zeros(positions.stop - positions.start, d, d, device=self.get_buffer("b0_0").device)
        for s, layout, rows, local in _scale_ranges(self.layouts, positions):
            channels = _offsets(layout)
            fine = torch.arange(local.start, local.stop, device=out.device)
            for i in range(len(layout.levels)):
                row, col = layout.cell_of(i, fine)
                for j in range(i + 1):
                    above, sub = layout.under(i, j, row, col)
                    out[rows, channels[i], channels[j]] = self._weight(s, i, j)[above, :, sub].transpose(1, 2)
        return out

    def gather(self, embeddings: torch.Tensor) -> Blocks:
        """(B, d, P) embeddings (all scales) -> their blocks, read at each cell's top-left position
        (the embedding must have the block structure, as FeatureExtractor gives it)."""
        out, start = [], 0
        for layout in self.layouts:
            emb = embeddings[:, :, start:start + layout.positions]
            out.append([emb[:, c][:, :, layout.first(i).to(emb.device)].permute(2, 0, 1).contiguous()
                        for i, c in enumerate(_offsets(layout))])
            start += layout.positions
        return out

    def distances(self, blocks: Blocks) -> torch.Tensor:
        """Blocks of B images -> (B, P) Mahalanobis distances, all scales, each row by row."""
        out = []
        for s, (layout, xs) in enumerate(zip(self.layouts, blocks, strict=True)):
            b, last = xs[0].shape[1], len(layout.levels) - 1
            squares = xs[0].new_empty(layout.positions, b)
            steps = list(_steps(layout, DISTANCE_TOP_CELLS))
            # scratch blocks for all steps: fresh temporaries this large cost page faults
            ys = [x.new_empty(steps[0][i].stop, b, x.shape[2]) for i, x in enumerate(xs)]
            zs = xs[0].new_empty(steps[0][-1].stop * b * max(x.shape[2] for x in xs))
            for parts in steps:
                for i, x in enumerate(xs):
                    y = torch.baddbmm(-self.get_buffer(f"b{s}_{i}")[parts[i]].unsqueeze(1), x[parts[i]],
                                      self.get_buffer(f"w{s}_{i}_{i}")[parts[i]], out=ys[i][:x[parts[i]].shape[0]])
                    for j in range(i):
                        w = self.get_buffer(f"w{s}_{i}_{j}")[parts[j]]
                        z = torch.bmm(xs[j][parts[j]], w, out=zs[:w.shape[0] * b * w.shape[2]].view(-1, b, w.shape[2]))
                        grouped = _side_by_side(y, layout, i, j)
                        grouped.add_(z.view(grouped.shape))
                    # each tap-i cell's squared norm, added to the r x r finest positions it spans
                    q = y.square_().sum(dim=2)
                    r, width = layout.levels[i].ratio, layout.levels[i].grid[1]
                    under = squares[parts[last]].view(-1, r, width, r, b)
                    q = q.view(-1, 1, width, 1, b)
                    if i == 0:
                        under.copy_(q.expand_as(under))
                    else:
                        under.add_(q)
            out.append(squares.sqrt_().T)
        return torch.cat(out, dim=1)
