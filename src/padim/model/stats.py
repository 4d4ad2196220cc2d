"""Streaming, mergeable per-position Gaussian statistics (count, sum, sum of outer products)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

COVARIANCE_ESTIMATORS = ("eps", "oas")
UPDATE_CHUNK = 128  # positions per step of a statistics update


def position_chunks(positions: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` of ``positions`` positions: the steps in which large
    per-position tensors are processed, so each step's temporaries stay small (or in cache)."""
    for start in range(0, positions, size):
        yield slice(start, min(start + size, positions))


@dataclass
class GaussianStats:
    """Sufficient statistics of one Gaussian per patch position, accumulated in float64.

    ``total`` is (P, D) and ``outer`` (P, D, D) for P positions and D channels. Two partial fits
    add up exactly to the fit on the union (``a + b``), so shards can be reduced in any order.
    """

    count: int
    total: torch.Tensor
    outer: torch.Tensor

    @classmethod
    def empty(cls, positions: int, dim: int, device: torch.device | str = "cpu") -> GaussianStats:
        """Statistics of zero samples."""
        return cls(
            0,
            torch.zeros(positions, dim, dtype=torch.float64, device=device),
            torch.zeros(positions, dim, dim, dtype=torch.float64, device=device),
        )

    def update(self, embeddings: torch.Tensor) -> None:
        """Add a batch of (B, D, P) embeddings, or (B, D, h, w) with the h*w grid cells as positions,
        in float64 (exact; :class:`StreamingStats` is the faster path for many batches)."""
        embeddings = checked_batch(embeddings, *self.total.shape)
        self.count += embeddings.shape[0]
        # a few positions at a time: their float64 copy stays in cache for the sum and the product
        for part in position_chunks(embeddings.shape[2], UPDATE_CHUNK):
            x = embeddings[:, :, part].to(torch.float64).permute(2, 0, 1)
            self.total[part] += x.sum(dim=1)
            self.outer[part].baddbmm_(x.transpose(1, 2), x)

    def __add__(self, other: GaussianStats) -> GaussianStats:
        if self.total.shape != other.total.shape:
            raise ValueError(f"cannot merge statistics of shapes {tuple(self.total.shape)} and "
                             f"{tuple(other.total.shape)}")
        return GaussianStats(self.count + other.count, self.total + other.total, self.outer + other.outer)

    def mean(self) -> torch.Tensor:
        """(P, D) sample mean."""
        if self.count < 1:
            raise ValueError("no samples accumulated")
        return self.total / self.count

    @property
    def positions(self) -> int:
        """Number of patch positions P."""
        return self.total.shape[0]

    @property
    def device(self) -> torch.device:
        """Where the sums are."""
        return self.total.device

    def covariance(self, eps: float, estimator: str = "eps", positions: slice = slice(None)) -> torch.Tensor:
        """(P, D, D) covariance per position plus ``eps`` on the diagonal (of ``positions`` only, to
        bound memory when P is large); see :func:`sums_covariance`."""
        if self.count < 2:
            raise ValueError(f"need at least 2 training images for a covariance, got {self.count}")
        return sums_covariance(self.outer[positions], self.mean()[positions], self.count, eps, estimator)


def sums_covariance(outer: torch.Tensor, mean: torch.Tensor, count: int, eps: float, estimator: str = "eps",
                    ) -> torch.Tensor:
    """(p, D, D) covariances plus ``eps`` on the diagonal from (p, D, D) float64 sums of x x^T and
    (p, D) means of ``count`` samples.

    estimator 'eps': the unbiased sample covariance (1/(N-1)), PaDiM's choice; 'oas': the same
    shrunk towards a scaled identity by the Oracle Approximating Shrinkage coefficient (Chen et
    al., 2010), which needs only the sample covariance, so it works on merged statistics.
    """
    if estimator not in COVARIANCE_ESTIMATORS:
        raise ValueError(f"covariance estimator must be one of {COVARIANCE_ESTIMATORS}, got {estimator!r}")
    if count < 2:
        raise ValueError(f"need at least 2 training images for a covariance, got {count}")
    n = count
    # (outer - n mean mean^T) / (n - 1) in one pass over the (P, D, D) sums
    cov = torch.baddbmm(outer, mean.unsqueeze(2), mean.unsqueeze(1), beta=1 / (n - 1), alpha=-n / (n - 1))
    if estimator == "oas":
        cov = oas_shrink(cov, n)
    cov.diagonal(dim1=1, dim2=2).add_(eps)
    if not all_finite(cov):
        raise FloatingPointError("the accumulated statistics hold NaN or inf")
    return cov


class StreamingStats:
    """Accumulates :class:`GaussianStats` batch after batch, faster than ``GaussianStats.update``.

    The outer products are summed in float32 over embeddings minus a per-position shift (the first
    batch's mean), then turned into float64 sums once, by :meth:`stats`. Shifted, the products are
    of the size of the spread, not of the mean, so float32 keeps their digits (on 450 fryum images
    the distances agree with the float64 sums to 6e-7; each batch adds one float32 rounding of the
    running sum), and the float32 running sums are half the memory and traffic of float64 ones.
    """

    def __init__(self, positions: int, dim: int, device: torch.device | str = "cpu"):
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.total = torch.zeros(positions, dim, dtype=torch.float64, device=device)  # sum of x - shift
        # sum of (x - shift)(x - shift)^T, one block per step of positions, so that stats() can
        # free each block once converted (whether the allocator hands the memory back to the
        # system at once depends on its state: a fit's peak is in building the factor anyway)
        self.parts = list(position_chunks(positions, UPDATE_CHUNK))
        self.outer = [torch.zeros(p.stop - p.start, dim, dim, device=device) for p in self.parts]

    def update(self, embeddings: torch.Tensor) -> None:
        """Add a batch of (B, D, P) embeddings, or (B, D, h, w) with the h*w grid cells as positions."""
        self._check_unconverted()
        embeddings = checked_batch(embeddings, *self.total.shape)
        x = embeddings.permute(2, 0, 1)  # (P, B, D): contiguous for the extractor's position-major output
        if x.shape[1] == 0:
            return  # the mean of no images is no shift
        if self.shift is None:
            self.shift = x.mean(dim=1).float()
        self.count += x.shape[1]
        # one scratch block for all steps: a fresh temporary per step, and the float64 copy of it
        # that the sums made, cost more in page faults than the arithmetic
        scratch = torch.empty(self.parts[0].stop, x.shape[1], x.shape[2], device=x.device)
        for part, outer in zip(self.parts, self.outer, strict=True):
            c = torch.sub(x[part], self.shift[part].unsqueeze(1), out=scratch[:part.stop - part.start])
            self.total[part] += c.sum(dim=1)  # float32 sums of one batch, accumulated in float64
            outer.baddbmm_(c.transpose(1, 2), c)

    def stats(self) -> GaussianStats:
        """The float64 sums of x and x x^T: with S = sum(x - s), sum x x^T = sum (x - s)(x - s)^T
        + s u^T + u s^T, u = S + n s / 2. Call once: the float32 sums are freed as they are converted."""
        if self.shift is None:
            raise ValueError("no samples accumulated")
        self._check_unconverted()
        positions, d = self.total.shape
        s = self.shift.to(torch.float64)
        outer = torch.empty(positions, d, d, dtype=torch.float64, device=self.total.device)
        self.outer.reverse()  # popped from the end, in position order
        for part in self.parts:
            add_shift_terms(outer[part].copy_(self.outer.pop()), s[part], self.total[part], self.count)
        return GaussianStats(self.count, self.total + self.count * s, outer)

    def _check_unconverted(self) -> None:
        if not self.outer:
            raise ValueError("these statistics were converted by stats(), which frees the running sums")


def add_shift_terms(outer: torch.Tensor, shift: torch.Tensor, total: torch.Tensor, count: int) -> None:
    """Turn (p, D, D) sums of (x - s)(x - s)^T over ``count`` samples into sums of x x^T, in place:
    add s u^T + u s^T, u = S + n s / 2, with S = ``total`` the (p, D) sum of x - s and s = ``shift``."""
    u = total + (count / 2) * shift
    outer.baddbmm_(shift.unsqueeze(2), u.unsqueeze(1))
    outer.baddbmm_(u.unsqueeze(2), shift.unsqueeze(1))


def checked_batch(embeddings: torch.Tensor, positions: int, dim: int) -> torch.Tensor:
    """(B, D, P) embeddings (a (B, D, h, w) batch flattened) of ``dim`` channels at ``positions``
    positions, all finite; a clear error otherwise."""
    embeddings = embeddings.flatten(2)
    b, d, p = embeddings.shape
    if (p, d) != (positions, dim):
        raise ValueError(f"embeddings of {d} channels x {p} positions do not match statistics "
                         f"{(positions, dim)}")
    check_finite(embeddings)
    return embeddings


def check_finite(features: torch.Tensor) -> None:
    """A clear error, before any statistic is updated, when a batch's features hold NaN or inf."""
    if not all_finite(features):
        bad = int((~torch.isfinite(features)).sum())
        raise FloatingPointError(f"the features of a batch hold {bad} NaN or inf value(s); statistics not updated")


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or inf in ``x``: its sum is finite (NaN and inf propagate; float64 sums of features
    do not overflow), one reduction instead of a boolean copy of a large tensor."""
    return bool(torch.isfinite(x.sum()))


def oas_shrink(cov: torch.Tensor, n: int) -> torch.Tensor:
    """OAS estimate from an unbiased (D, D) covariance of ``n`` samples: its maximum-likelihood
    version shrunk towards mu*I, as scikit-learn's ``OAS`` computes it."""
    p = cov.shape[-1]
    mle = cov * ((n - 1) / n)
    mu = mle.diagonal(dim1=1, dim2=2).mean(dim=1)
    alpha = mle.square().mean(dim=(1, 2))
    num = alpha + mu.square()
    den = (n + 1) * (alpha - mu.square() / p)
    shrink = torch.where(den > 0, (num / den.clamp_min(1e-300)).clamp(max=1.0), torch.ones_like(den))
    eye = torch.eye(p, dtype=cov.dtype, device=cov.device)
    return (1 - shrink).view(-1, 1, 1) * mle + (shrink * mu).view(-1, 1, 1) * eye


def whitening_factors(stats, eps: float, estimator: str = "eps", chunk: int | None = None,
                      ) -> Iterator[tuple[slice, torch.Tensor]]:
    """The float64 whitening factors of every position of ``stats`` (GaussianStats, or CellStats
    whose sums are expanded chunk by chunk), ``chunk`` positions at a time, as
    (positions, (p, D, D) factors): the temporaries stay small next to the statistics, and the
    caller keeps each chunk in whatever form it needs. Default chunk: 64 positions on CPU, whose
    covariances, factors and inverses stay in cache, else 1024 (see docs/performance.md)."""
    positions = stats.positions
    chunk = chunk or (64 if stats.device.type == "cpu" else 1024)
    for part in position_chunks(positions, chunk):
        yield part, whitening_factor(stats.covariance(eps, estimator, part), first=part.start)


def whitening_factor(cov: torch.Tensor, first: int = 0) -> torch.Tensor:
    """Lower-triangular W = L^-1 with cov = L L^T, so the Mahalanobis distance is |W (x - mean)|.
    ``first``: the position of ``cov[0]``, so an error names the position among all of them."""
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info.max()) > 0:
        bad = first + int((info > 0).nonzero()[0])
        raise FloatingPointError(f"covariance at position {bad} is not positive definite; increase eps")
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device).expand_as(cov)
    factor = torch.linalg.solve_triangular(chol, eye, upper=False)
    if not all_finite(factor):  # NaN input can pass cholesky_ex without an error code
        raise FloatingPointError("the whitening factor holds NaN or inf; the statistics are not finite")
    return factor
