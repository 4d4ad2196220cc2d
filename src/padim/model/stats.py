"""Streaming, mergeable Gaussian statistics of embeddings in a block layout: the count and, per
cell, float64 sums of x and of x x^T (the pair blocks of :mod:`padim.model.cells`). One class for
every layout: a nested one (nearest tap resizing: each deep statistic once per cell of its tap) or
the trivial one (every statistic per position)."""

from __future__ import annotations

import torch

from ..backbones.layout import ScaleLayout
from ..params import COVARIANCE_ESTIMATORS
from .cells import (
    Blocks,
    block_at,
    expand_pairs,
    expand_vectors,
    grouped,
    pair_positions,
    row_steps,
    side_by_side,
    vector_at,
)
from .io import expect_tensor

STATS_TOP_CELLS = 16  # deepest cells per step of an update (fewer: smaller products, run slower)


class GaussianStats:
    """Sufficient statistics of one Gaussian per finest position, kept per cell of ``layouts``.

    Sums are of x - shift (the first batch's mean): each batch's products are formed in float32 on
    centred values, where they keep their digits, and added into float64 sums, whose rounding does
    not grow with the number of images. Two partial fits add up to the fit on the union (``a + b``,
    ``a += b``), so shards reduce in any order. ``total[s][i]``: (tap-i cells, C_i) sums of x_i;
    ``pairs[s][i][j]``, j <= i: (tap-j cells, t t C_i, C_j) sums of x_i x_j^T.
    """

    def __init__(self, layouts: list[ScaleLayout], device: torch.device | str = "cpu"):
        self.layouts = list(layouts)
        self.count = 0
        self.shift: Blocks | None = None
        self.total = [[torch.zeros(lv.cells, lv.channels, dtype=torch.float64, device=device)
                       for lv in lay.levels] for lay in layouts]
        self.pairs = [[[torch.zeros(b.cells, lay.step(i, j) ** 2 * a.channels, b.channels, dtype=torch.float64,
                                    device=device)
                        for j, b in enumerate(lay.levels[:i + 1])] for i, a in enumerate(lay.levels)]
                      for lay in layouts]

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

    def update(self, blocks: Blocks) -> None:
        """Add a batch of embedding blocks: per scale, per tap, (cells, B, C)."""
        self._check(blocks)
        b = blocks[0][0].shape[1]
        if b == 0:
            return
        if self.shift is None:
            self.shift = [[x.mean(dim=1).float() for x in scale] for scale in blocks]
        self.count += b
        for layout, xs, shifts, totals, pairs in zip(self.layouts, blocks, self.shift, self.total, self.pairs,
                                                     strict=True):
            # scratch for all steps: fresh temporaries this large cost page faults
            steps = list(row_steps(layout, STATS_TOP_CELLS))
            centred = [x.new_empty(steps[0][i].stop, b, x.shape[2]) for i, x in enumerate(xs)]
            side = [x.new_empty(steps[0][-1].stop * b * x.shape[2]) for x in xs]
            size = max((steps[0][j].stop - steps[0][j].start) * p.shape[1] * p.shape[2]
                       for row in pairs for j, p in enumerate(row))
            # the float32 product widened in a float64 scratch before the add: a mixed-type add runs
            # several times slower than the copy and the add
            product, wide = xs[0].new_empty(size), pairs[0][0].new_empty(size)
            for parts in steps:
                c = [torch.sub(x[p], s[p].unsqueeze(1), out=buf[:p.stop - p.start])
                     for x, s, p, buf in zip(xs, shifts, parts, centred, strict=True)]
                for i, ci in enumerate(c):
                    totals[i][parts[i]] += ci.sum(dim=1, dtype=torch.float64)
                    for j in range(i + 1):
                        if j == i:
                            lhs = ci.transpose(1, 2)
                        else:  # one product per tap-j cell, its tap-i cells side by side
                            cells = side_by_side(ci, layout, i, j).permute(0, 1, 3, 4, 5, 2)
                            lhs = side[i][:ci.numel()].view(cells.shape).copy_(cells).view(c[j].shape[0], -1, b)
                        target = pairs[i][j][parts[j]]
                        out = torch.bmm(lhs, c[j], out=product[:target.numel()].view(target.shape))
                        target += wide[:target.numel()].view(target.shape).copy_(out)

    def _check(self, blocks: Blocks) -> None:
        """A clear error, before any sum changes, for blocks of the wrong shape or holding NaN or inf."""
        b = blocks[0][0].shape[1]
        expected = [[(lv.cells, b, lv.channels) for lv in lay.levels] for lay in self.layouts]
        got = [[tuple(x.shape) for x in scale] for scale in blocks]
        if got != expected:
            raise ValueError(f"embeddings of shapes {got} do not match statistics of shapes {expected}")
        bad = sum(int((~torch.isfinite(x)).sum()) for scale in blocks for x in scale
                  if not bool(torch.isfinite(x.sum())))
        if bad:
            raise FloatingPointError(f"the features of a batch hold {bad} NaN or inf value(s); statistics not updated")

    # ----------------------------------------------------------------- merging
    def __iadd__(self, other: GaussianStats) -> GaussianStats:
        if self.layouts != other.layouts:
            raise ValueError("cannot merge statistics of different layouts (image size, scales, channels or "
                             "covariance estimator differ)")
        if other.count == 0:
            return self
        if self.count == 0:
            self.shift = [[x.clone() for x in scale] for scale in other.shift]
        total, pairs = other.about(self.shift)
        self.count += other.count
        for mine, theirs in zip(self.total, total, strict=True):
            for a, b in zip(mine, theirs, strict=True):
                a += b
        for mine, theirs in zip(self.pairs, pairs, strict=True):
            for row_a, row_b in zip(mine, theirs, strict=True):
                for a, b in zip(row_a, row_b, strict=True):
                    a += b
        return self

    def __add__(self, other: GaussianStats) -> GaussianStats:
        out = GaussianStats(self.layouts, self.device)
        out += self
        out += other
        return out

    def about(self, shift: Blocks) -> tuple[list[list[torch.Tensor]], list[list[list[torch.Tensor]]]]:
        """New (total, pairs): these sums re-expressed about ``shift``. With c = x - s, d = s - t:
        sum (x - t) = S + n d; sum (x_i - t_i)(x_j - t_j)^T = sum c_i c_j^T + u_i d_j^T + d_i u_j^T,
        u = S + n d / 2."""
        n = self.count
        delta = [[a.double() - b.double() for a, b in zip(mine, theirs, strict=True)]
                 for mine, theirs in zip(self.shift, shift, strict=True)]
        total = [[t + n * d for t, d in zip(ts, ds, strict=True)] for ts, ds in zip(self.total, delta, strict=True)]
        pairs = []
        for layout, ts, ds, ps in zip(self.layouts, self.total, delta, self.pairs, strict=True):
            u = [t + (n / 2) * d for t, d in zip(ts, ds, strict=True)]
            pairs.append([[p.clone().baddbmm_(grouped(u[i], layout, i, j).unsqueeze(2), ds[j].unsqueeze(1))
                           .baddbmm_(grouped(ds[i], layout, i, j).unsqueeze(2), u[j].unsqueeze(1))
                           for j, p in enumerate(row)] for i, row in enumerate(ps)])
        return total, pairs

    def to_layouts(self, layouts: list[ScaleLayout]) -> GaussianStats:
        """These statistics kept per cell of other ``layouts`` of the same grids and channels (e.g.
        per position, from sums kept per cell): each value read at the top-left finest position of
        the target cell. Exact where the embeddings are constant over the target cells."""
        if layouts == self.layouts:
            return self
        out = GaussianStats(layouts, self.device)
        if [lay.positions for lay in layouts] != [lay.positions for lay in self.layouts] or \
                [lv.channels for lv in layouts[0].levels] != [lv.channels for lv in self.layouts[0].levels]:
            theirs = (sum(lay.positions for lay in layouts), sum(lv.channels for lv in layouts[0].levels))
            raise ValueError(f"statistics of {self.positions} positions and {self.dim} channels do not fit a model "
                             f"of {theirs[0]} and {theirs[1]} (image size, scales or channels differ)")
        out.count = self.count
        if self.shift is None:
            return out
        for s, (src, dst) in enumerate(zip(self.layouts, layouts, strict=True)):
            for i in range(len(dst.levels)):
                first = dst.first(i).to(self.device)
                out.total[s][i] = vector_at(src, self.total[s][i], i, first)
                for j in range(i + 1):
                    fine = pair_positions(dst, i, j).to(self.device)
                    out.pairs[s][i][j] = block_at(src, self.pairs[s][i][j], i, j, fine).reshape(
                        out.pairs[s][i][j].shape).contiguous()
        out.shift = [[vector_at(src, x, i, dst.first(i).to(self.device)) for i, x in enumerate(scale)]
                     for scale, src, dst in zip(self.shift, self.layouts, layouts, strict=True)]
        return out

    def scale(self, factor: float) -> GaussianStats:
        """Weigh every image so far by ``factor`` (in place): a drifting line's older images count
        less. The count becomes an effective count (a real number)."""
        if not 0 < factor <= 1:
            raise ValueError(f"decay must be in (0, 1], got {factor}")
        self.count *= factor
        for t in [*(x for row in self.total for x in row), *(p for lay in self.pairs for row in lay for p in row)]:
            t.mul_(factor)
        return self

    # ----------------------------------------------------------------- file state
    def state(self) -> dict[str, torch.Tensor]:
        """The sums as float32 tensors (``shift{s}_{i}``, ``total{s}_{i}``, ``pairs{s}_{i}_{j}``):
        one rounding of float64 sums about a shift, a relative 6e-8 of each, whatever the count."""
        if self.shift is None:
            raise ValueError("no samples accumulated")
        out = {}
        for s, (shift, total, pairs) in enumerate(zip(self.shift, self.total, self.pairs, strict=True)):
            for i, row in enumerate(pairs):
                out[f"shift{s}_{i}"], out[f"total{s}_{i}"] = shift[i].float().cpu(), total[i].float().cpu()
                out.update({f"pairs{s}_{i}_{j}": p.float().cpu().contiguous() for j, p in enumerate(row)})
        return out

    @classmethod
    def from_state(cls, layouts: list[ScaleLayout], count: float, tensors: dict[str, torch.Tensor],
                   device: torch.device | str = "cpu") -> GaussianStats:
        """The statistics of :meth:`state`'s ``tensors`` and their ``count``; ValueError names a
        missing, extra, misshapen or non-finite tensor."""
        out = cls(layouts, device)
        if not (isinstance(count, int | float) and count >= 2):
            raise ValueError(f"count {count!r} is not a number >= 2")
        out.count, out.shift, names = count, [[None] * len(lay.levels) for lay in layouts], set()

        def take(name: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            names.add(name)
            return expect_tensor(tensors, name, tuple(like.shape), torch.float32).to(device, dtype)

        for s, lay in enumerate(layouts):
            for i in range(len(lay.levels)):
                out.shift[s][i] = take(f"shift{s}_{i}", out.total[s][i], torch.float32)
                out.total[s][i] = take(f"total{s}_{i}", out.total[s][i], torch.float64)
                out.pairs[s][i] = [take(f"pairs{s}_{i}_{j}", p, torch.float64) for j, p in enumerate(out.pairs[s][i])]
        extra = sorted(set(tensors) - names)
        if extra:
            raise ValueError(f"unexpected tensor(s) {', '.join(extra)}")
        return out

    # ----------------------------------------------------------------- per position (tests, references)
    def mean(self) -> torch.Tensor:
        """(P, d) float64 sample mean."""
        if self.count < 1:
            raise ValueError("no samples accumulated")
        return (expand_vectors(self.layouts, self.shift, slice(None))
                + expand_vectors(self.layouts, self.total, slice(None)) / self.count)

    def sums(self, positions: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """The float64 (p, d) sums of x and (p, d, d) sums of x x^T of ``positions`` (of all scales)."""
        s = expand_vectors(self.layouts, self.shift, positions)
        total = expand_vectors(self.layouts, self.total, positions)
        outer = expand_pairs(self.layouts, self.pairs, positions)
        u = total + (self.count / 2) * s
        outer.baddbmm_(s.unsqueeze(2), u.unsqueeze(1)).baddbmm_(u.unsqueeze(2), s.unsqueeze(1))
        return total + self.count * s, outer

    def covariance(self, eps: float, estimator: str = "eps", positions: slice = slice(None)) -> torch.Tensor:
        """(p, d, d) covariance per position of ``positions`` plus ``eps`` on the diagonal (see
        :func:`covariance`)."""
        return covariance(expand_pairs(self.layouts, self.pairs, positions),
                          expand_vectors(self.layouts, self.total, positions), self.count, eps, estimator)


def covariance(outer: torch.Tensor, sums: torch.Tensor, count: int, eps: float, estimator: str = "eps",
               ) -> torch.Tensor:
    """(p, D, D) covariances plus ``eps`` on the diagonal from float64 (p, D, D) sums of c c^T and
    (p, D) sums of c over ``count`` samples, c = x - shift for any shift.

    estimator 'eps': the unbiased sample covariance (1/(N-1)), PaDiM's choice; 'oas': the same
    shrunk towards a scaled identity by the Oracle Approximating Shrinkage coefficient (Chen et
    al., 2010), which needs only the sample covariance, so it works on merged statistics.
    """
    if estimator not in COVARIANCE_ESTIMATORS:
        raise ValueError(f"covariance estimator must be one of {COVARIANCE_ESTIMATORS}, got {estimator!r}")
    check_count(count)
    n = count
    cov = torch.baddbmm(outer, sums.unsqueeze(2), sums.unsqueeze(1), beta=1 / (n - 1), alpha=-1 / (n * (n - 1)))
    if estimator == "oas":
        trace, squares = cov.diagonal(dim1=1, dim2=2).sum(dim=1), cov.square().sum(dim=(1, 2))
        keep, target = oas(trace, squares, cov.shape[-1], n)
        cov = cov * keep.view(-1, 1, 1)
        cov.diagonal(dim1=1, dim2=2).add_(target.unsqueeze(1))
    cov.diagonal(dim1=1, dim2=2).add_(eps)
    check_finite(cov)
    return cov


def oas(trace: torch.Tensor, squares: torch.Tensor, dim: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The OAS estimate as scikit-learn's ``OAS`` computes it from an unbiased covariance C of ``n``
    samples, given per position its ``trace`` and sum of ``squares`` of all entries: (a, b) such
    that the estimate is a C + b I (the maximum-likelihood C (n-1)/n shrunk towards mu I)."""
    ml = (n - 1) / n
    mu = trace * ml / dim
    alpha = squares * ml * ml / (dim * dim)
    num = alpha + mu.square()
    den = (n + 1) * (alpha - mu.square() / dim)
    shrink = torch.where(den > 0, (num / den.clamp_min(1e-300)).clamp(max=1.0), torch.ones_like(den))
    return (1 - shrink) * ml, shrink * mu


def check_count(count: int) -> None:
    """A clear error for fewer than 2 samples, which have no covariance."""
    if count < 2:
        raise ValueError(f"need at least 2 training images for a covariance, got {count}")


def check_finite(x: torch.Tensor) -> None:
    """One reduction instead of a boolean copy of a large tensor: NaN and inf propagate to the sum."""
    if not bool(torch.isfinite(x.sum())):
        raise FloatingPointError("the accumulated statistics hold NaN or inf")


DEEP_PREFIX = "deep_"  # the deep tap's tensors beside the map's, in a model file and a statistics sidecar


def split_deep(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the map's tensors, the deep tap's with DEEP_PREFIX taken off their names)."""
    main = {k: v for k, v in tensors.items() if not k.startswith(DEEP_PREFIX)}
    return main, {k[len(DEEP_PREFIX):]: v for k, v in tensors.items() if k.startswith(DEEP_PREFIX)}


class JointStats:
    """The statistics of a model with the deep image score: the map's (``main``, in the model's
    layout) and the deep tap's (``deep``, one Gaussian per position of its own grid), fed from one
    embedding's blocks (the deep tap's last, see :mod:`padim.model.embedding`). The same surface as
    :class:`GaussianStats` where the model uses it: update, add, scale, shift, state."""

    def __init__(self, main: GaussianStats, deep: GaussianStats):
        self.main, self.deep = main, deep

    @property
    def count(self) -> float:
        return self.main.count

    @property
    def shift(self) -> Blocks | None:
        """Both parts' shifts, in the blocks' order (None before the first update)."""
        return None if self.main.shift is None else [*self.main.shift, *self.deep.shift]

    @property
    def device(self) -> torch.device:
        return self.main.device

    def update(self, blocks: Blocks) -> None:
        """Add a batch of embedding blocks (the scales', then the deep tap's)."""
        k = len(self.main.layouts)
        self.deep._check(blocks[k:])  # both checked before either changes
        self.main.update(blocks[:k])
        self.deep.update(blocks[k:])

    def __iadd__(self, other: JointStats) -> JointStats:
        if not isinstance(other, JointStats):
            raise ValueError("cannot merge statistics with and without the deep image score's")
        self.main += other.main
        self.deep += other.deep
        return self

    def __add__(self, other: JointStats) -> JointStats:
        out = JointStats(GaussianStats(self.main.layouts, self.device), GaussianStats(self.deep.layouts, self.device))
        out += self
        out += other
        return out

    def to_layouts(self, layouts: list[ScaleLayout]) -> JointStats:
        """The map's statistics in other ``layouts`` (see :meth:`GaussianStats.to_layouts`)."""
        main = self.main.to_layouts(layouts)
        return self if main is self.main else JointStats(main, self.deep)

    def scale(self, factor: float) -> JointStats:
        """See :meth:`GaussianStats.scale`."""
        self.main.scale(factor)
        self.deep.scale(factor)
        return self

    def state(self) -> dict[str, torch.Tensor]:
        """Both parts' :meth:`GaussianStats.state`, the deep one's names prefixed ``deep_``."""
        return {**self.main.state(), **{DEEP_PREFIX + k: v for k, v in self.deep.state().items()}}

    @classmethod
    def from_state(cls, layouts: list[ScaleLayout], deep_layout: ScaleLayout, count: float,
                   tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> JointStats:
        """The statistics of :meth:`state`'s ``tensors``; ValueError names a bad one."""
        main, deep = split_deep(tensors)
        if not deep:
            raise ValueError("no statistics of the deep image score (deep_* tensors)")
        return cls(GaussianStats.from_state(layouts, count, main, device),
                   GaussianStats.from_state([deep_layout], count, deep, device))
