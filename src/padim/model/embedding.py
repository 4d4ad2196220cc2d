"""The form a model's embeddings take, chosen once per model: position by position, or cell by
cell where the deeper taps are resized by nearest neighbour on the CPU (see
:mod:`padim.model.cells`). Each form embeds images, makes the buffers that batches are written
into, and makes the statistics and the whitening that consume its embeddings, so the estimator's
fit and predict are written once for both."""

from __future__ import annotations

import torch

from ..backbones import FeatureExtractor
from ..backbones.layout import ScaleLayout
from .cells import Blocks, BlockStats
from .stats import StreamingStats, position_chunks
from .whitening import STATE_CHUNK, CellWhitening, PositionWhitening, fill_whitening


class PositionEmbedding:
    """(B, d, P) embeddings of ``size`` inputs, P the positions of every scale."""

    def __init__(self, extractor: FeatureExtractor, size: tuple[int, int]):
        self.extractor = extractor
        self.size = (int(size[0]), int(size[1]))
        self.grids = extractor.grids(self.size)
        self.positions = sum(h * w for h, w in self.grids)
        self.dim = int(extractor.channels.numel())

    @property
    def device(self) -> torch.device:
        return self.extractor.mean.device

    def __call__(self, images: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> (B, d, P), written into ``out`` (see :meth:`buffer`) if given."""
        return self.extractor(images, out)

    def buffer(self, images: int) -> torch.Tensor:
        """A buffer for ``images`` embeddings, to write batch after batch into."""
        return self.extractor.buffer(images, self.size)

    def window(self, out: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The part of a buffer that holds images [start, stop), to write into."""
        return out[:, start:stop]

    def filled(self, out: torch.Tensor, images: int) -> torch.Tensor:
        """The embeddings of the first ``images`` images written into a buffer."""
        return out[:, :images].permute(1, 2, 0)

    def running_stats(self) -> StreamingStats:
        """Empty statistics that take these embeddings."""
        return StreamingStats(self.positions, self.dim, self.device)

    def whitening(self) -> PositionWhitening:
        """An empty whitening that scores these embeddings."""
        return PositionWhitening(self.positions, self.dim, self.device)

    def adopt(self, whitening: PositionWhitening | CellWhitening) -> PositionWhitening | CellWhitening:
        """``whitening`` in the form that scores these embeddings: as it is, or its factor copied
        chunk by chunk into an empty one (e.g. a model stored per cell, scored on a GPU)."""
        if isinstance(whitening, CellWhitening) == isinstance(self, CellEmbedding):
            return whitening
        target = self.whitening()
        chunks = position_chunks(self.positions, STATE_CHUNK)
        fill_whitening(target, ((part, whitening.factor_of(part)) for part in chunks), whitening.mean)
        return target


class CellEmbedding(PositionEmbedding):
    """Per scale, per tap (deepest first), the (cells, B, C) tap embeddings: each deep feature once
    per cell of its tap instead of once per finest position (FeatureExtractor.blocks)."""

    def __init__(self, extractor: FeatureExtractor, size: tuple[int, int], layouts: list[ScaleLayout]):
        super().__init__(extractor, size)
        self.layouts = layouts

    def __call__(self, images: torch.Tensor, out: Blocks | None = None) -> Blocks:
        return self.extractor.blocks(images, out)

    def buffer(self, images: int) -> Blocks:
        return self.extractor.block_buffer(images, self.size)

    def window(self, out: Blocks, start: int, stop: int) -> Blocks:
        return [[t[:, start:stop] for t in scale] for scale in out]

    def filled(self, out: Blocks, images: int) -> Blocks:
        return self.window(out, 0, images)

    def running_stats(self) -> BlockStats:
        return BlockStats(self.layouts, self.device)

    def whitening(self) -> CellWhitening:
        return CellWhitening(self.layouts, self.device)


def embedding_for(extractor: FeatureExtractor, size: tuple[int, int]) -> PositionEmbedding:
    """The cell form where the extractor's embeddings of ``size`` inputs have a block layout and run
    on the CPU (on a GPU one large product per step is faster), else the position form."""
    layouts = extractor.block_layouts(size) if extractor.mean.device.type == "cpu" else None
    return CellEmbedding(extractor, size, layouts) if layouts is not None else PositionEmbedding(extractor, size)
