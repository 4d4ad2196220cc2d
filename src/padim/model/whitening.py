"""A fitted model's Gaussians in scoring form: per cell of its layout (see :mod:`padim.model.cells`)
the rows of the whitening factor W = L^-1 of the covariance (cov = L L^T) and W mean, so that the
Mahalanobis distance is |W x - W mean|. Filled from a fit (:meth:`Whitening.set_rows` for every
tap's cells, then :meth:`Whitening.finish` with the mean) or from a model file's tensors; gives the
distances of embedding blocks (``distances``) and of plain (B, d, P) embeddings in tensor operations
an export can trace (``graph_distances``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..backbones.layout import ScaleLayout
from .cells import Blocks, position_chunks, row_steps, scale_ranges, side_by_side, tap_channels
from .io import expect_tensor

DISTANCE_TOP_CELLS = 64  # deepest cells per step of the distances
STATE_CHUNK = 1024  # positions per step of packing and unpacking: the full (P, d, d) factor never exists


def _check_diagonal(diagonal: torch.Tensor) -> None:
    if not bool((diagonal > 0).all()):  # W = L^-1 of a Cholesky factor: positive diagonal
        raise ValueError("whitening factor has a non-positive diagonal; the file was altered or damaged")


class Whitening(nn.Module):
    """The whitening factor W and W mean of block-layout embeddings, kept per cell: for each scale
    and taps j <= i, ``w{s}_{i}_{j}`` holds, per tap-j cell, W_ij^T of the t x t tap-i cells under
    it side by side, (C_j, t t C_i), so that one product per tap-j cell gives all of them;
    ``b{s}_{i}`` holds W_i mean per tap-i cell. A model file keeps these blocks (storage 'cells'), or
    for the trivial layout W's lower triangle per position (storage 'positions')."""

    def __init__(self, layouts: list[ScaleLayout], device: torch.device | str = "cpu"):
        super().__init__()
        self.layouts = layouts
        self.register_buffer("mean", torch.zeros(sum(lay.positions for lay in layouts),
                                                 sum(lv.channels for lv in layouts[0].levels), device=device))
        for s, layout in enumerate(layouts):
            for i, a in enumerate(layout.levels):
                self.register_buffer(f"b{s}_{i}", torch.zeros(a.cells, a.channels, device=device))
                for j, b in enumerate(layout.levels[:i + 1]):
                    # each block is written whole by fill() or load_state(), but for the zero upper
                    # triangles of the diagonal ones, which a model file does not store
                    new = torch.zeros if j == i else torch.empty
                    self.register_buffer(f"w{s}_{i}_{j}", new(
                        b.cells, b.channels, layout.step(i, j) ** 2 * a.channels, device=device))

    def _weight(self, s: int, i: int, j: int) -> torch.Tensor:
        """``w{s}_{i}_{j}`` as (tap-j cells, C_j, t t, C_i)."""
        w = self.get_buffer(f"w{s}_{i}_{j}")
        return w.view(w.shape[0], w.shape[1], -1, self.layouts[s].levels[i].channels)

    @property
    def storage(self) -> str:
        """How a model file keeps the factor: 'positions' for the trivial layout, else 'cells'."""
        return "positions" if all(lv.ratio == 1 for lay in self.layouts for lv in lay.levels) else "cells"

    def set_rows(self, s: int, i: int, cells: slice | torch.Tensor, rows: torch.Tensor) -> None:
        """Keep the (n, C_i, channels of taps <= i) rows of W of tap-i ``cells`` (a slice or an
        index tensor) of scale ``s``."""
        layout, channels = self.layouts[s], tap_channels(self.layouts[s])
        index = torch.arange(cells.start, cells.stop, device=rows.device) if isinstance(cells, slice) else cells
        width = layout.levels[i].grid[1]
        for j in range(i + 1):
            above, sub = layout.under(i, j, index // width, index % width)
            self._weight(s, i, j)[above, :, sub] = rows[:, :, channels[j]].transpose(1, 2).to(self.mean.dtype)

    def fill(self, positions: slice, factor: torch.Tensor) -> None:
        """Take the rows of the (p, d, d) ``factor`` of ``positions`` (of all scales) at the top-left
        finest position of each cell; call for every position in turn, then :meth:`finish`."""
        for s, layout, rows, local in scale_ranges(self.layouts, positions):
            channels = tap_channels(layout)
            f = factor[rows]
            fine = torch.arange(local.start, local.stop, device=f.device)
            for i, level in enumerate(layout.levels):
                first = (fine // layout.levels[-1].grid[1] % level.ratio == 0) & (fine % level.ratio == 0)
                if bool(first.any()):
                    row, col = layout.cell_of(i, fine[first])
                    self.set_rows(s, i, row * level.grid[1] + col, f[first][:, channels[i], :channels[i].stop])

    def finish(self, mean: torch.Tensor) -> None:
        """Keep the (P, d) ``mean`` (all scales) and set W mean per cell, once the weights are filled."""
        self.mean = mean.float().contiguous().to(self.mean.device)
        start = 0
        for s, layout in enumerate(self.layouts):
            xs = self._cells(self.mean[start:start + layout.positions].T.unsqueeze(0), layout)
            start += layout.positions
            for i in range(len(layout.levels)):
                self.get_buffer(f"b{s}_{i}").copy_(self._project(s, xs, i)[:, 0])

    def _cells(self, embeddings: torch.Tensor, layout: ScaleLayout) -> list[torch.Tensor]:
        """(B, d, P) embeddings of one scale -> per tap, its (cells, B, C_i) values, read at each
        cell's top-left position."""
        return [embeddings[:, c][:, :, layout.first(i).to(embeddings.device)].permute(2, 0, 1)
                for i, c in enumerate(tap_channels(layout))]

    def _project(self, s: int, xs: list[torch.Tensor], i: int) -> torch.Tensor:
        """W_i x (the rows of tap i of W times x, without W mean) per tap-i cell, (cells, B, C_i),
        for per-tap (cells, B, C_j) values ``xs`` of scale ``s``: one product per tap j <= i, with
        the t x t tap-i cells under a tap-j cell side by side, put in tap-i cell order."""
        layout = self.layouts[s]
        (h, w), c = layout.levels[i].grid, layout.levels[i].channels
        y = torch.bmm(xs[i], self.get_buffer(f"w{s}_{i}_{i}"))
        for j in range(i):
            t, (hj, wj) = layout.step(i, j), layout.levels[j].grid
            z = torch.bmm(xs[j], self.get_buffer(f"w{s}_{i}_{j}"))  # (tap-j cells, B, t t C_i)
            y = y + z.reshape(hj, wj, -1, t, t, c).permute(0, 3, 1, 4, 2, 5).reshape(h * w, -1, c)
        return y

    def factor_of(self, positions: slice) -> torch.Tensor:
        """The (p, d, d) whitening factor of ``positions`` (of all scales), rebuilt from the cells."""
        positions = slice(*positions.indices(self.mean.shape[0])[:2])
        d = self.mean.shape[1]
        out = torch.zeros(positions.stop - positions.start, d, d, device=self.mean.device)
        for s, layout, rows, local in scale_ranges(self.layouts, positions):
            channels = tap_channels(layout)
            fine = torch.arange(local.start, local.stop, device=out.device)
            for i in range(len(layout.levels)):
                row, col = layout.cell_of(i, fine)
                for j in range(i + 1):
                    above, sub = layout.under(i, j, row, col)
                    out[rows, channels[i], channels[j]] = self._weight(s, i, j)[above, :, sub].transpose(1, 2)
        return out

    def graph_distances(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, d, P) embeddings -> (B, P) distances, as :meth:`distances` computes them, in plain
        tensor operations that a trace records as a static graph (an ONNX export): per tap, the
        cells are gathered from the embedding, multiplied by the per-cell weights of every tap
        above, and each cell's squared norm is spread over the finest positions it covers."""
        out, start = [], 0
        for s, layout in enumerate(self.layouts):
            xs = self._cells(embeddings[:, :, start:start + layout.positions], layout)
            start += layout.positions
            squares = None
            for i, level in enumerate(layout.levels):
                (h, w), r = level.grid, level.ratio
                y = self._project(s, xs, i) - self.get_buffer(f"b{s}_{i}").unsqueeze(1)
                q = y.square().sum(dim=2).reshape(h, 1, w, 1, -1).expand(h, r, w, r, -1)
                q = q.reshape(layout.positions, -1)
                squares = q if squares is None else squares + q
            out.append(squares.sqrt().T)
        return torch.cat(out, dim=1)

    def distances(self, blocks: Blocks) -> torch.Tensor:
        """Blocks of B images -> (B, P) Mahalanobis distances, all scales, each row by row."""
        out = []
        for s, (layout, xs) in enumerate(zip(self.layouts, blocks, strict=True)):
            b, last = xs[0].shape[1], len(layout.levels) - 1
            squares = xs[0].new_empty(layout.positions, b)
            steps = list(row_steps(layout, DISTANCE_TOP_CELLS))
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
                        grouped = side_by_side(y, layout, i, j)
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

    def _stored_shapes(self) -> dict[str, tuple[int, ...]]:
        """The stored cell tensors: for taps j < i of scale s, ``w{s}_{i}_{j}`` as kept, (tap-j
        cells, C_j, t t C_i); for j = i the upper triangle of W_ii^T per tap-i cell (its zero half
        dropped), (tap-i cells, C_i (C_i + 1) / 2)."""
        out = {}
        for s, layout in enumerate(self.layouts):
            for i, a in enumerate(layout.levels):
                for j, b in enumerate(layout.levels[:i + 1]):
                    out[f"w{s}_{i}_{j}"] = ((a.cells, a.channels * (a.channels + 1) // 2) if j == i
                                            else (b.cells, b.channels, layout.step(i, j) ** 2 * a.channels))
        return out

    def state(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Model-file tensors: ``mean`` and, in ``dtype``, the cell weights or (storage 'positions')
        ``factor_tril``, the lower triangle of each W row by row, (P, d(d+1)/2). W mean is
        recomputed on load."""
        out = {"mean": self.mean.cpu().contiguous()}
        if self.storage == "positions":
            positions, d = self.mean.shape
            rows, cols = torch.tril_indices(d, d)
            packed = torch.empty(positions, rows.numel(), dtype=dtype)
            for part in position_chunks(positions, STATE_CHUNK):
                packed[part] = self.factor_of(part).cpu()[:, rows, cols]
            return {**out, "factor_tril": packed}
        for name, shape in self._stored_shapes().items():
            w = self.get_buffer(name).cpu()
            if len(shape) == 2:  # a diagonal block, (cells, C, C)
                rows, cols = torch.triu_indices(w.shape[1], w.shape[1])
                w = w[:, rows, cols]
            out[name] = w.to(dtype).contiguous()
        return out

    def tensor_names(self) -> set[str]:
        """The names :meth:`state` writes."""
        return {"mean", "factor_tril"} if self.storage == "positions" else {"mean", *self._stored_shapes()}

    def load_state(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        """Fill from :meth:`state`'s tensors (ValueError names a missing or bad one)."""
        mean = expect_tensor(tensors, "mean", tuple(self.mean.shape), torch.float32)
        if self.storage == "positions":
            positions, d = self.mean.shape
            packed = expect_tensor(tensors, "factor_tril", (positions, d * (d + 1) // 2), dtype)
            rows, cols = torch.tril_indices(d, d)
            _check_diagonal(packed[:, rows == cols])
            for part in position_chunks(positions, STATE_CHUNK):
                factor = torch.zeros(part.stop - part.start, d, d, device=self.mean.device)
                factor[:, rows, cols] = packed[part].float().to(self.mean.device)
                self.fill(part, factor)
            self.finish(mean)
            return
        for name, shape in self._stored_shapes().items():
            w = expect_tensor(tensors, name, shape, dtype)
            target = self.get_buffer(name)
            if len(shape) == 2:
                c = target.shape[1]
                rows, cols = torch.triu_indices(c, c)
                _check_diagonal(w[:, rows == cols])
                target[:, rows, cols] = w.float().to(target.device)
            else:
                target.copy_(w)
        self.finish(mean)
