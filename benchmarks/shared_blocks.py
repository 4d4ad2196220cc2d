"""Feasibility timing for a design that is not built: shared deep blocks under nearest tap resizing.

With ``tap_resize='nearest'`` each deep tap is constant over the fine positions it covers (MobileNetV2:
96 layer-3 channels over 4x4 positions, 32 layer-2 channels over 2x2). With channels ordered deep
first, the deep blocks of every covariance and of its whitening factor are then shared, and only the
rows of the fine channels are per position. This times, on synthetic numbers with the real shapes
(256 px, one scale), the statistics update and the Mahalanobis product both ways, and prints ms per
image. It measures arithmetic only: no model, no data.

    .venv/bin/python benchmarks/shared_blocks.py
"""

from __future__ import annotations

import statistics

import torch
from timing import timed

from padim.model.stats import position_chunks

FINE, MID, DEEP = 24, 32, 96  # MobileNetV2 tap channels at stride 4, 8, 16
D = FINE + MID + DEEP
SIDE = 64  # fine grid of a 256 px input
STEP = 128  # positions per update step, as StreamingStats
CHUNK = 64  # positions per product, as PadimScorer
HEAD = 88  # PadimScorer's head block at D = 152


def per_image(fn, images: int, repeats: int = 5) -> float:
    return 1e3 * statistics.median(timed(fn, repeats)) / images


def main() -> None:
    fine, mid, deep = SIDE * SIDE, (SIDE // 2) ** 2, (SIDE // 4) ** 2
    with torch.inference_mode():
        b = 64  # images per statistics update
        x, x_mid, x_deep = torch.randn(fine, b, D), torch.randn(mid, b, MID + DEEP), torch.randn(deep, b, DEEP)
        sums = torch.zeros(fine, D, D)
        rows_fine, rows_mid, rows_deep = torch.zeros(fine, FINE, D), torch.zeros(mid, MID, MID + DEEP), torch.zeros(
            deep, DEEP, DEEP)

        def update_full() -> None:
            for p in position_chunks(fine, STEP):
                sums[p].baddbmm_(x[p].transpose(1, 2), x[p])

        def update_shared() -> None:  # channels deep first: [deep, mid, fine]
            for p in position_chunks(fine, STEP):
                rows_fine[p].baddbmm_(x[p][:, :, DEEP + MID:].transpose(1, 2), x[p])
            for p in position_chunks(mid, STEP):
                rows_mid[p].baddbmm_(x_mid[p][:, :, DEEP:].transpose(1, 2), x_mid[p])
            for p in position_chunks(deep, STEP):
                rows_deep[p].baddbmm_(x_deep[p].transpose(1, 2), x_deep[p])

        print(f"statistics update, {b} images: full {per_image(update_full, b):.3f} ms/img, "
              f"shared {per_image(update_shared, b):.3f} ms/img")

        b = 16  # predict batch
        x, x_mid, x_deep = torch.randn(fine, b, D), torch.randn(mid, b, MID + DEEP), torch.randn(deep, b, DEEP)
        head, tail = torch.randn(fine, HEAD, HEAD), torch.randn(fine, D, D - HEAD)
        w_fine, w_mid, w_deep = torch.randn(fine, D, FINE), torch.randn(mid, MID + DEEP, MID), torch.randn(
            deep, DEEP, DEEP)

        def squared_norms(inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            parts = position_chunks(len(inputs), CHUNK)
            return torch.cat([torch.bmm(inputs[p], weight[p]).square().sum(2) for p in parts])

        def distances_full() -> torch.Tensor:
            return squared_norms(x[:, :, :HEAD], head) + squared_norms(x, tail)

        def distances_shared() -> torch.Tensor:
            n = SIDE // 2
            at_mid = squared_norms(x_mid, w_mid).view(n, 1, n, 1, b).expand(n, 2, n, 2, b).reshape(fine, b)
            n = SIDE // 4
            at_deep = squared_norms(x_deep, w_deep).view(n, 1, n, 1, b).expand(n, 4, n, 4, b).reshape(fine, b)
            return squared_norms(x, w_fine) + at_mid + at_deep

        print(f"Mahalanobis product, batch {b}: full {per_image(distances_full, b):.3f} ms/img, "
              f"shared {per_image(distances_shared, b):.3f} ms/img")


if __name__ == "__main__":
    main()
