"""The form a model's embeddings take, chosen once per model by :func:`embedding_for`: per scale,
per tap (deepest first), (cells, B, C) blocks of a layout (see :mod:`padim.model.cells`). Nested
cells where the deeper taps are resized by nearest neighbour and the covariance is the same over a
cell; else the trivial layout, one cell per position. The statistics and the whitening of a model
take its layout, so fit and predict are written once for both. A model with the deep image score
has one more block after the scales': the deep tap's (positions, B, C), its own trivial layout."""

from __future__ import annotations

import torch

from ..backbones import FeatureExtractor
from ..backbones.layout import ScaleLayout, trivial_layout
from .cells import Blocks, tap_channels
from .stats import GaussianStats, JointStats
from .whitening import Whitening


class Embedding:
    """Embeddings of ``size`` inputs as blocks of ``layouts`` (one per scale); the subclasses say
    where the blocks come from."""

    def __init__(self, extractor: FeatureExtractor, size: tuple[int, int], layouts: list[ScaleLayout]):
        self.extractor = extractor
        self.size = (int(size[0]), int(size[1]))
        self.grids = extractor.grids(self.size)
        self.layouts = layouts
        self.positions = sum(h * w for h, w in self.grids)
        self.dim = int(extractor.channels.numel())
        self.deep_layout = (trivial_layout([extractor.deep_channels], extractor.deep_grid(self.size))
                            if extractor.deep_channels else None)

    @property
    def device(self) -> torch.device:
        return self.extractor.mean.device

    def __call__(self, images: torch.Tensor, out=None) -> Blocks:
        """uint8 (B, 3, H, W) -> blocks, written into ``out`` (a :meth:`window` of a :meth:`buffer`) if given."""
        if self.deep_layout is None:
            return self._embed(images, None if out is None else out[0])
        maps: list[torch.Tensor] = []
        blocks = self._embed(images, None if out is None else out[0], maps)
        deep = torch.cat(maps).flatten(2).permute(2, 0, 1)  # (positions, B, C)
        if out is not None:
            deep = out[1][:, :deep.shape[1]].copy_(deep)
        return [*blocks, [deep]]

    def buffer(self, images: int):
        """A buffer for ``images`` embeddings, to write batch after batch into."""
        deep = None if self.deep_layout is None else torch.empty(
            self.deep_layout.positions, images, self.deep_layout.levels[0].channels, device=self.device)
        return self._buffer(images), deep

    def window(self, out, start: int, stop: int):
        """The part of a buffer that holds images [start, stop), to write into."""
        return self._window(out[0], start, stop), None if out[1] is None else out[1][:, start:stop]

    def filled(self, out, images: int) -> Blocks:
        """The blocks of the first ``images`` images written into a buffer."""
        blocks = self._filled(out[0], images)
        return blocks if out[1] is None else [*blocks, [out[1][:, :images]]]

    def _embed(self, images: torch.Tensor, out, deep: list[torch.Tensor] | None = None) -> Blocks:
        raise NotImplementedError

    def _buffer(self, images: int):
        raise NotImplementedError

    def _window(self, out, start: int, stop: int):
        raise NotImplementedError

    def _filled(self, out, images: int) -> Blocks:
        raise NotImplementedError

    def stats(self) -> GaussianStats | JointStats:
        """Empty statistics of these embeddings."""
        stats = GaussianStats(self.layouts, self.device)
        return stats if self.deep_layout is None else JointStats(stats, GaussianStats([self.deep_layout], self.device))

    def stats_from_state(self, count: float, tensors: dict[str, torch.Tensor]) -> GaussianStats | JointStats:
        """The statistics of a sidecar's ``tensors`` (see ``state``); ValueError names a bad one."""
        if self.deep_layout is None:
            return GaussianStats.from_state(self.layouts, count, tensors, self.device)
        return JointStats.from_state(self.layouts, self.deep_layout, count, tensors, self.device)

    def whitening(self) -> Whitening:
        """An empty whitening that scores these embeddings."""
        return Whitening(self.layouts, self.device)


class CellEmbedding(Embedding):
    """Nested cells, straight from the extractor's per-tap blocks (each deep feature once per cell)."""

    def _embed(self, images: torch.Tensor, out=None, deep: list[torch.Tensor] | None = None) -> Blocks:
        return self.extractor.blocks(images, out, deep)

    def _buffer(self, images: int) -> Blocks:
        return self.extractor.block_buffer(images, self.size)

    def _window(self, out: Blocks, start: int, stop: int) -> Blocks:
        return [[t[:, start:stop] for t in scale] for scale in out]

    def _filled(self, out: Blocks, images: int) -> Blocks:
        return self._window(out, 0, images)


class PositionEmbedding(Embedding):
    """The trivial layout: views of the extractor's (P, B, d) position-major embedding, each tap's
    channels at every position."""

    def _embed(self, images: torch.Tensor, out: torch.Tensor | None = None,
               deep: list[torch.Tensor] | None = None) -> Blocks:
        return self.split(self.extractor(images, out, deep))

    def split(self, embeddings: torch.Tensor) -> Blocks:
        """(B, d, P) embeddings -> the trivial layout's blocks (views)."""
        x, out, start = embeddings.permute(2, 0, 1), [], 0
        for layout in self.layouts:
            out.append([x[start:start + layout.positions, :, c] for c in tap_channels(layout)])
            start += layout.positions
        return out

    def _buffer(self, images: int) -> torch.Tensor:
        return self.extractor.buffer(images, self.size)

    def _window(self, out: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return out[:, start:stop]

    def _filled(self, out: torch.Tensor, images: int) -> Blocks:
        return self.split(out[:, :images].permute(1, 2, 0))


def embedding_for(extractor: FeatureExtractor, size: tuple[int, int], covariance: str = "eps",
                  storage: str | None = None) -> Embedding:
    """The nested cells where the extractor's embeddings of ``size`` inputs have them and the
    ``covariance`` estimator gives the same covariance across a cell ('eps'; 'oas' shrinks each
    position by its own coefficient), else the trivial layout; ``storage`` (a model file's
    'cells' or 'positions') overrides the choice."""
    cells = extractor.block_layouts(size)
    use_cells = cells is not None and (covariance == "eps" if storage is None else storage == "cells")
    if storage == "cells" and cells is None:
        raise ValueError(f"factor stored per cell, but tap_resize {extractor.tap_resize!r} at {list(size)} "
                         "has no cells")
    if use_cells:
        return CellEmbedding(extractor, size, cells)
    return PositionEmbedding(extractor, size, [trivial_layout(extractor.tap_sizes(), g) for g in extractor.grids(size)])
