"""A fitted scorer in the form an export traces: each step in plain tensor operations, so that the
trace is one static graph with the model's numbers as constants."""

from __future__ import annotations

import torch
from torch import nn

from ..model import PadimScorer


class ScoringGraph(nn.Module):
    """uint8 (B, 3, H, W) -> (maps (B, H, W), scores (B,)), as ``scorer`` computes them: the whole
    batch through the network at once (no micro-batches or buffers), each pyramid level resized by
    two matrix products (ONNX's Resize filters differently from torch), the distances by
    ``graph_distances`` of the scorer's whitening (per cell for a cell model, so the graph holds the
    weights the model file holds; the deep tap's too, for the deep image score), then the scorer's
    own anomaly maps and scores."""

    def __init__(self, scorer: PadimScorer):
        super().__init__()
        self.scorer = scorer
        extractor, size = scorer.extractor, scorer.image_size
        device = extractor.mean.device
        # built before the trace, so that it records them as constants, not as computations
        self.resize = [None if level == size else extractor.resize_matrices(size, level, device)
                       for level in extractor.level_sizes(size)]
        for grid in scorer.maps.grids:
            scorer.maps.smoothing(grid, device)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        extractor = self.scorer.extractor
        x = extractor.normalize(images)
        levels, deep = [], []
        for k, matrices in enumerate(self.resize):
            level = x if matrices is None else torch.matmul(torch.matmul(matrices[0], x.contiguous()), matrices[1])
            levels.append(extractor.features(level, deep if k == extractor.deep_level else None).flatten(2))
        embeddings = levels[0] if len(levels) == 1 else torch.cat(levels, dim=2)
        far = None if self.scorer.deep is None else self.scorer.deep.graph_distances(deep[0].flatten(2))
        scores, maps = self.scorer.maps(self.scorer.whitening.graph_distances(embeddings), far)
        return maps, scores  # the exported graph's outputs, in its order: 'maps', 'scores'
