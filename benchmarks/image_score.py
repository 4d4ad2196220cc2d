"""Image-score candidates of issue 28, from one fitted model: the test split is embedded once (and
once mirrored), and every candidate image score and map is computed from the same distances.

    python benchmarks/image_score.py RUN_DIR DATA_ROOT --category C [--out rows.jsonl]

RUN_DIR is a ``padim run`` / ``padim benchmark`` run folder (its model.safetensors is loaded, not
refitted). Candidates (none looks at test labels; the metrics do):

- ``map_max``: today's score, the max of the averaged, blurred pyramid map (the model's own).
- ``fine_max``: the max of the finest level's blurred map alone (no pyramid averaging).
- ``raw_max_mean``: each level's largest raw distance (no upsampling, no blur), averaged over levels.
- ``fine_raw_max``: the finest level's largest raw distance.
- ``raw_pool2_max``: each level's raw distances averaged over 2x2 positions (a coarser map), its
  max, averaged over levels.
- ``half_sigma_max``: the max of the pyramid map blurred with half the sigma.
- ``hflip``: the maps of the image and of its mirror image (mirrored back) averaged; its max. Its
  pixel metrics are its own.
- ``hflip_raw_max_mean``: ``raw_max_mean`` of the raw distances averaged with the mirrored ones.
- ``colour``: a second Gaussian per finest-level position of 6 colour statistics (mean and standard
  deviation of R, G, B over the 8x8 pixels around it), fitted on all training images; its squared
  distance added to the finest level's squared CNN distance before the maps are made.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from padim.datasets import load_split
from padim.datasets.images import ImageFiles
from padim.evaluation import _pixel_data
from padim.metrics import metrics_and_curves
from padim.model import Padim
from padim.model.scorer import AnomalyMaps

COLOUR_EPS = 1e-4  # colour in [0, 1]: about (2.5 / 255)^2, JPEG's noise floor


def levels(dist: torch.Tensor, grids) -> list[torch.Tensor]:
    """(B, P) distances -> per level (B, h, w)."""
    out, start = [], 0
    for h, w in grids:
        out.append(dist[:, start:start + h * w].reshape(-1, h, w))
        start += h * w
    return out


def colour_features(images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> (B, h*w, 6): mean and std of R, G, B over the 8x8 pixels around each
    stride-4 position of the finest grid."""
    x = images.float() / 255
    mean = F.avg_pool2d(x, 8, stride=4, padding=2, count_include_pad=False)
    sq = F.avg_pool2d(x * x, 8, stride=4, padding=2, count_include_pad=False)
    std = (sq - mean * mean).clamp_min(0).sqrt()
    feats = torch.cat([mean, std], 1)
    feats = F.interpolate(feats, size=grid, mode="nearest") if feats.shape[-2:] != grid else feats
    return feats.flatten(2).transpose(1, 2)


def batches(paths, size, batch=16):
    loader = torch.utils.data.DataLoader(ImageFiles(paths, size), batch_size=batch, num_workers=1)
    yield from loader


@torch.inference_mode()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("data_root", type=Path)
    ap.add_argument("--category", required=True)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-colour", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    split = load_split(args.data_root, args.category)
    model = Padim.load(args.run_dir / "model.safetensors", progress=False)
    scorer = model.check_fitted()
    emb, grids, size = scorer.embedding, scorer.maps.grids, scorer.image_size
    p = model.params_
    half = AnomalyMaps(grids, size, p.sigma / 2)
    fine = AnomalyMaps(grids[:1], size, p.sigma)

    colour = None
    if not args.no_colour:  # per-position Gaussian of the colour statistics, all training images
        n, s1, s2 = 0, 0.0, 0.0
        for images in batches([s.path for s in split.train], size):
            f = colour_features(images, grids[0]).double()
            n += len(f)
            s1 = s1 + f.sum(0)
            s2 = s2 + torch.einsum("bpi,bpj->pij", f, f)
        mu = s1 / n
        cov = (s2 - n * torch.einsum("pi,pj->pij", mu, mu)) / (n - 1) + COLOUR_EPS * torch.eye(6, dtype=torch.float64)
        colour = (mu.float(), torch.linalg.inv(torch.linalg.cholesky(cov)).float())

    test = split.test
    scores: dict[str, list] = {k: [] for k in ("map_max", "fine_max", "raw_max_mean", "fine_raw_max",
                                               "raw_pool2_max", "half_sigma_max", "hflip", "hflip_raw_max_mean",
                                               "colour")}
    maps_of: dict[str, list] = {"map_max": [], "hflip": [], "colour": []}
    for images in batches([s.path for s in test], size):
        dist = scorer.whitening.distances(emb(images))
        maps, base = scorer.maps(dist)
        scores["map_max"].append(base)
        maps_of["map_max"].append(maps.numpy())
        lv = levels(dist, grids)
        scores["fine_max"].append(fine(lv[0].flatten(1))[1])
        scores["raw_max_mean"].append(torch.stack([v.flatten(1).amax(1) for v in lv]).mean(0))
        scores["fine_raw_max"].append(lv[0].flatten(1).amax(1))
        scores["raw_pool2_max"].append(torch.stack([F.avg_pool2d(v[:, None], 2, 1).flatten(1).amax(1)
                                                    for v in lv]).mean(0))
        scores["half_sigma_max"].append(half(dist)[1])
        fdist = scorer.whitening.distances(emb(images.flip(-1)))
        fmaps, _ = scorer.maps(fdist)
        hmaps = (maps + fmaps.flip(-1)) / 2
        scores["hflip"].append(hmaps.flatten(1).amax(1))
        maps_of["hflip"].append(hmaps.numpy())
        flv = levels(fdist, grids)
        scores["hflip_raw_max_mean"].append(torch.stack([((v + f.flip(-1)) / 2).flatten(1).amax(1)
                                                         for v, f in zip(lv, flv, strict=True)]).mean(0))
        if colour is not None:
            mu, w = colour
            z = torch.einsum("pij,bpj->bpi", w, colour_features(images, grids[0]) - mu)
            d2 = (z * z).sum(-1)
            both = dist.clone()
            h, wd = grids[0]
            both[:, :h * wd] = (dist[:, :h * wd] ** 2 + d2).sqrt()
            cmaps, cs = scorer.maps(both)
            scores["colour"].append(cs)
            maps_of["colour"].append(cmaps.numpy())
    if colour is None:
        del scores["colour"], maps_of["colour"]
    labels = [s.label for s in test]
    defects = [s.defects for s in test]
    rows = []
    for name, values in scores.items():
        maps = np.concatenate(maps_of.get(name, maps_of["map_max"]))
        masks, pm = _pixel_data(test, maps, "model")
        metrics, _ = metrics_and_curves(labels, torch.cat(values).numpy(), defects, masks, pm, None)
        o = metrics["overall"]
        row = {"run": str(args.run_dir), "category": args.category, "candidate": name,
               "image_auroc": o["image_auroc"], "pixel_auroc": o["pixel_auroc"], "aupro": o["aupro"],
               "per_defect": {t: {k: b[k] for k in ("image_auroc", "pixel_auroc", "aupro")}
                              for t, b in metrics["per_defect_type"].items()}}
        rows.append(row)
        print(f"{args.category:12s} {name:20s} {o['image_auroc']:.3f} {o['pixel_auroc']:.3f} {o['aupro']:.3f}",
              flush=True)
    print(f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if args.out:
        with args.out.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
