"""From statistics to the whitening factor W = L^-1 (cov = L L^T), block by block of taps and cell
by cell (see :mod:`padim.model.cells`): the rows of tap i at a tap-i cell need the covariance blocks
of taps <= i there and the rows of the deeper taps, which their own (larger) cells already gave.

With P the channels of the deeper taps at a tap-i cell, cov = [[A_PP, A_Pi], [A_iP, A_ii]] and
W_PP known: L_iP = A_iP W_PP^T, L_ii = chol(A_ii - L_iP L_iP^T), W_ii = L_ii^-1 and
W_iP = -W_ii L_iP W_PP. All in batched float64 products (the statistics' precision), a few rows
of the deepest grid at a time; only the Cholesky factor and inverse of each C_i x C_i diagonal block
go through LAPACK. The trivial layout (one cell per position) runs the same steps per position.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..params import COVARIANCE_ESTIMATORS
from .cells import row_steps, spread, ungrouped
from .stats import GaussianStats, check_count, check_finite, oas

FACTOR_TOP_CELLS = 32  # deepest cells per step: its temporaries stay within tens of MB


def whitening_factor(cov: torch.Tensor, first: int = 0) -> torch.Tensor:
    """Lower-triangular W = L^-1 of (p, D, D) covariances (a per-position reference; fits use
    :func:`factor_rows`). ``first``: the position of ``cov[0]``, for the error message."""
    chol = cholesky(cov, torch.arange(first, first + cov.shape[0]))
    return triangular_inverse(chol)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run a batch of small LAPACK calls on one thread: each matrix is too small to share, and a
    second thread only adds a synchronization per matrix (ruinous on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cholesky(cov: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Cholesky factors; an error naming the first position (``positions[k]`` for ``cov[k]``) whose
    covariance is not positive definite."""
    with one_thread():
        chol, info = torch.linalg.cholesky_ex(cov)
    if int(info.max()) > 0:
        bad = int(positions[int((info > 0).nonzero()[0])])
        raise FloatingPointError(f"covariance at position {bad} is not positive definite; increase eps")
    return chol


def triangular_inverse(chol: torch.Tensor) -> torch.Tensor:
    """L^-1 of lower-triangular (p, C, C) ``chol``; finite or an error (NaN passes cholesky_ex)."""
    eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device).expand_as(chol)
    with one_thread():
        inverse = torch.linalg.solve_triangular(chol, eye, upper=False)
    if not bool(torch.isfinite(inverse.sum())):
        raise FloatingPointError("the whitening factor holds NaN or inf; the statistics are not finite")
    return inverse


def covariance_blocks(stats: GaussianStats, s: int, parts: list[slice], n: int) -> list[list[torch.Tensor]]:
    """The unbiased covariance blocks (i, j), j <= i, per tap-i cell of the cells ``parts`` of scale
    ``s``, from sums about any shift."""
    layout, blocks = stats.layouts[s], []
    for i in range(len(layout.levels)):
        ti = stats.total[s][i][parts[i]]
        row = []
        for j in range(i + 1):
            pair = stats.pairs[s][i][j][parts[j]]
            a = pair if j == i else ungrouped(pair, layout, i, j)
            tj = ti if j == i else spread(stats.total[s][j][parts[j]], layout, i, j)
            row.append(torch.baddbmm(a, ti.unsqueeze(2), tj.unsqueeze(1), beta=1 / (n - 1), alpha=-1 / (n * (n - 1))))
        blocks.append(row)
    return blocks


def shrink_blocks(blocks: list[list[torch.Tensor]], dim: int, n: int) -> None:
    """OAS on covariance blocks that hold every block of each position (the trivial layout), in place."""
    trace = sum(row[-1].diagonal(dim1=1, dim2=2).sum(dim=1) for row in blocks)
    squares = sum(b.square().sum(dim=(1, 2)) * (1 if j == i else 2) for i, row in enumerate(blocks)
                  for j, b in enumerate(row))
    keep, target = oas(trace, squares, dim, n)
    for row in blocks:
        for b in row:
            b.mul_(keep.view(-1, 1, 1))
        row[-1].diagonal(dim1=1, dim2=2).add_(target.unsqueeze(1))


def factor_rows(stats: GaussianStats, eps: float, estimator: str = "eps", relative: bool = False,
                ) -> Iterator[tuple[int, int, slice, torch.Tensor]]:
    """Yield (scale, tap i, tap-i cells, float64 (n, C_i, channels of taps <= i) rows of W) for
    every cell of every tap, a few rows of the deepest grid at a time. ``relative``: ``eps`` times
    each cell's mean variance of the tap goes on the diagonal (the same strength at any feature
    scale), instead of ``eps`` itself.

    'oas' shrinks each position's whole covariance by its own coefficient, so it needs every block
    at a position: the trivial layout (the estimator picks it, see Embedding)."""
    if estimator not in COVARIANCE_ESTIMATORS:
        raise ValueError(f"covariance estimator must be one of {COVARIANCE_ESTIMATORS}, got {estimator!r}")
    check_count(stats.count)
    n, start = stats.count, 0
    for s, layout in enumerate(stats.layouts):
        levels = layout.levels
        if estimator == "oas" and any(lv.ratio != 1 for lv in levels):
            raise ValueError("the 'oas' covariance needs statistics per position, not per cell")
        steps = list(row_steps(layout, FACTOR_TOP_CELLS))
        # per tap, the deeper taps' rows of W at each cell: zero above the block diagonal, which
        # no step writes, so one zeroed buffer serves every step (fresh ones cost page faults)
        deeper = [sum(lv.channels for lv in levels[:i]) for i in range(len(levels))]
        w_pp_buffers = [torch.zeros(steps[0][i].stop, p, p, dtype=torch.float64, device=stats.device) if p else None
                        for i, p in enumerate(deeper)]
        for parts in steps:
            blocks = covariance_blocks(stats, s, parts, n)
            if estimator == "oas":
                shrink_blocks(blocks, stats.dim, n)
            rows: list[torch.Tensor] = []
            for i, row in enumerate(blocks):
                a_ii = row[-1]
                diagonal = a_ii.diagonal(dim1=1, dim2=2)
                # a floor keeps a position whose features never vary (a blank region) invertible
                diagonal.add_((eps * diagonal.mean(dim=1, keepdim=True)).clamp_min(1e-6) if relative else eps)
                check_finite(a_ii)
                positions = start + layout.first(i)[parts[i]]
                if i == 0:
                    rows.append(triangular_inverse(cholesky(a_ii, positions)))
                    yield s, i, parts[i], rows[-1]
                    continue
                w_pp, offset = w_pp_buffers[i][:a_ii.shape[0]], 0
                for j in range(i):
                    c = levels[j].channels
                    w_pp[:, offset:offset + c, :offset + c] = spread(rows[j], layout, i, j)
                    offset += c
                l_ip = torch.bmm(torch.cat(row[:-1], dim=2), w_pp.transpose(1, 2))
                w_ii = triangular_inverse(cholesky(torch.baddbmm(a_ii, l_ip, l_ip.transpose(1, 2), alpha=-1),
                                                   positions))
                rows.append(torch.cat([-torch.bmm(w_ii, torch.bmm(l_ip, w_pp)), w_ii], dim=2))
                yield s, i, parts[i], rows[-1]
        start += layout.positions
