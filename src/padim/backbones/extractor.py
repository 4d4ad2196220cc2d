"""Turn uint8 images into PaDiM embeddings: normalize, run the backbone, resize the three taps to
the finest one, concatenate, keep a fixed random channel subset; optionally at several input
scales, whose positions are concatenated."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..params import check_param, check_scales
from .layout import ScaleLayout, scale_layout
from .registry import get_spec, weights_record


def channel_index(total: int, d: int, seed: int) -> torch.Tensor:
    """Sorted random subset of ``d`` of ``total`` channels, fixed by ``seed`` (PaDiM's reduction)."""
    if not 0 < d <= total:
        raise ValueError(f"d must be in 1..{total} for this backbone, got {d}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[:d].sort().values


# Input pixels per network call on the CPU. Fewer, larger calls spread each layer's fixed cost over
# more images; past about this many pixels the activations no longer stay in the caches and a call
# gets slower per image (benchmarks/micro_batch.py; docs/performance.md).
MICRO_PIXELS = 320_000


def micro_batch_for(size: tuple[int, int]) -> int:
    """Images per network call for (h, w) inputs: the largest power of two whose pixels stay within
    MICRO_PIXELS, at least 1 (256 x 256: 4; 320 x 480: 2; larger: 1)."""
    n = max(1, MICRO_PIXELS // (int(size[0]) * int(size[1])))
    return 1 << (n.bit_length() - 1)


def fold_batch_norms(net: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d in a Sequential into that
    convolution's weights (the same function, one pass over the activations fewer). In place."""
    for module in net.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for i in range(len(module) - 1):
            conv, bn = module[i], module[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                module[i] = fuse_conv_bn_eval(conv, bn)
                module[i + 1] = nn.Identity()
    return net


def scaled_size(size: tuple[int, int], scale: float, multiple: int = 16) -> tuple[int, int]:
    """The input size of one pyramid level: ``size`` itself at scale 1, else ``size`` times ``scale``
    rounded to a multiple of ``multiple`` (at least one): with the deepest tap's stride, each
    deeper tap's grid then divides the finer ones evenly (see FeatureExtractor.block_layouts)."""
    if scale == 1.0:
        return (int(size[0]), int(size[1]))
    return tuple(max(multiple, round(n * scale / multiple) * multiple) for n in size)


def resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) linear map equal to antialiased bilinear resizing along one axis."""
    # two identical columns: torch's antialiased kernel treats a width-1 input differently
    basis = torch.eye(n_in, dtype=torch.float64)[:, None, :, None].expand(-1, -1, -1, 2)
    out = F.interpolate(basis, size=(n_out, 2), mode="bilinear", align_corners=False, antialias=True)
    return out[:, 0, :, 0].T.contiguous().float()


class FeatureExtractor(nn.Module):
    """uint8 (B, 3, H, W) images -> float32 (B, d, P) embeddings, P the stride-4 positions of every
    scale in ``scales`` (the input resized by that factor, antialiased), scale by scale, row-major.

    ``channels`` indexes the taps' channels concatenated in tap order; the embedding holds the kept
    ones deepest tap first (see :meth:`block_layouts`). ``pool`` > 1 averages each tap over a pool x pool
    neighbourhood at its own resolution (PatchCore's local aggregation; 1 = plain PaDiM).
    ``tap_resize`` is how the deeper taps are brought to the stride-4 grid. The network runs on
    ``micro_batch`` images at a time ('auto': :func:`micro_batch_for` the input size; None: the whole
    batch): its activations then stay in the CPU caches, several times faster per image than one
    large batch on CPU (see benchmarks/speed.py).
    ``weights_files``: the weights files the network was loaded from (see ``weights_record``).
    ``deep``: also give the backbone's deep tap (stride 32, pooled as the others, all its channels)
    at the largest scale, for the deep image score: pass a list as ``deep`` to :meth:`forward` or
    :meth:`blocks` and they append its (B, C, h, w) maps to it, batch part by batch part.
    ``feature_dtype``: 'bfloat16' runs the network under autocast (bfloat16 convolutions summing in
    float32, several times less memory traffic), its taps turned back into float32; 'float32'
    runs it as it is (see :meth:`float32` for an export).
    """

    def __init__(self, backbone: str, channels: torch.Tensor, weights: Path | None = None, pretrained: bool = True,
                 pool: int = 1, tap_resize: str = "nearest", micro_batch: int | Literal["auto"] | None = "auto",
                 scales: Sequence[float] = (1.0,), deep: bool = False, feature_dtype: str = "float32"):
        super().__init__()
        check_param("feature_dtype", feature_dtype)
        self.bfloat16 = feature_dtype == "bfloat16"
        self.scales = check_scales(scales)
        self._grids: dict[tuple[int, int], list[list[tuple[int, int]]]] = {}
        self._layouts: dict[tuple[int, int], list[ScaleLayout] | None] = {}
        check_param("pool", pool)
        check_param("tap_resize", tap_resize)
        spec = get_spec(backbone)
        # channels-last lets oneDNN pick its fast depthwise and 1x1 convolution kernels on CPU
        net = fold_batch_norms(spec.build(weights, pretrained, deep).eval())
        self.net = net.requires_grad_(False).to(memory_format=torch.channels_last)
        # name and sha256 of each weights file, hashed once as the network was built (None: random)
        self.weights_files: list[dict[str, str]] | None = weights_record(net)
        self.micro_batch = micro_batch
        self.pool = pool
        self.tap_resize = tap_resize
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("channels", channels.to(torch.long))
        # the subset split per tap, so unused channels are never pooled or resized
        offsets = torch.tensor([0, *spec.channels]).cumsum(0)
        self.taps_count = len(spec.channels)
        self.deep_channels = spec.deep_channels if deep else 0
        self.deep_level = self.scales.index(max(self.scales))  # the deep tap comes from the finest input
        self.stride = 4 * 2 ** (self.taps_count - 1)  # of the deepest tap: the first is at 4, each next at 2x
        for i in range(len(spec.channels)):
            keep = channels[(channels >= offsets[i]) & (channels < offsets[i + 1])] - offsets[i]
            self.register_buffer(f"tap{i}", keep.to(torch.long))

    def forward(self, images: torch.Tensor, out: torch.Tensor | None = None,
                deep: list[torch.Tensor] | None = None) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> (B, d, P). ``out``: a (P, B', d) float32 buffer with B' >= B (see
        :meth:`buffer`) that the result is written into (its first B images) instead of a new
        tensor; the result is then a view of it, valid until the buffer is written again.
        ``deep``: a list the deep tap's maps are appended to (see the class docstring)."""
        size = (int(images.shape[-2]), int(images.shape[-1]))  # plain ints: an export fixes H and W
        sizes = self.level_sizes(size)
        step = self.step(size)
        if step is None or images.device.type != "cpu" or (out is None and images.shape[0] <= step):
            x = self.normalize(images)
            levels = [self.features(self._downscale(x, hw), deep if k == self.deep_level else None).flatten(2)
                      for k, hw in enumerate(sizes)]
            emb = levels[0] if len(levels) == 1 else torch.cat(levels, dim=2)
            if out is None:
                return emb
            out = self._output(out, (emb.shape[2], emb.shape[0], emb.shape[1]), emb.device)
            out.copy_(emb.permute(2, 0, 1))
            return out.permute(1, 2, 0)
        # image by image, normalization, network and tap processing stay in the caches (normalizing
        # a whole batch at once costs far more per image); each result goes straight into a
        # position-major (P, B, d) buffer, the layout scoring and statistics consume
        scratch = self._scratch(images, step)
        for start, chunk in zip(range(0, images.shape[0], step), images.split(step), strict=True):
            chunk = self.normalize(chunk, scratch)
            levels = [self.features(self._downscale(chunk, hw), deep if k == self.deep_level else None)
                      for k, hw in enumerate(sizes)]
            if start == 0:
                positions = sum(e.shape[2] * e.shape[3] for e in levels)
                out = self._output(out, (positions, images.shape[0], levels[0].shape[1]), images.device)
            first = 0
            for e in levels:
                b, d, h, w = e.shape
                out[first:first + h * w, start:start + b] = e.permute(2, 3, 0, 1).reshape(h * w, b, d)
                first += h * w
        return out.permute(1, 2, 0)

    @staticmethod
    def _output(out: torch.Tensor | None, shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        """``out``'s first shape[1] images, or a new (P, B, d) tensor when there is no buffer."""
        if out is None:
            return torch.empty(shape, device=device)
        positions, b, d = shape
        if out.dim() != 3 or out.shape[0] != positions or out.shape[1] < b or out.shape[2] != d:
            raise ValueError(f"out buffer of shape {tuple(out.shape)} cannot hold ({positions}, {b}, {d}) "
                             f"embeddings")
        return out[:, :b]

    def buffer(self, batch_size: int, size: tuple[int, int]) -> torch.Tensor:
        """An empty (P, batch_size, d) ``out`` buffer for ``size`` inputs. A loop that reuses one
        saves a fresh allocation of tens of MB per batch, whose page faults cost more than the copy."""
        positions = sum(h * w for h, w in self.grids(size))
        return torch.empty(positions, batch_size, self.channels.numel(), device=self.mean.device)

    def level_sizes(self, size: tuple[int, int]) -> list[tuple[int, int]]:
        """The input size of each pyramid level for ``size`` inputs (see scaled_size)."""
        return [scaled_size(size, s, self.stride) for s in self.scales]

    def normalize(self, images: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32 normalized with the backbone's ImageNet mean and std.
        ``out``: a float32 (B', 3, H, W) tensor, B' >= B, to write into: a loop that reuses one saves
        allocations whose page faults cost more than the arithmetic. (NCHW: converting uint8 to
        channels-last float in one pass, or resizing channels-last, is slower than either here.)"""
        if out is None:
            return (images.float() - self.mean) / self.std
        out = out[:images.shape[0]]
        out.copy_(images)
        return out.sub_(self.mean).div_(self.std)

    def step(self, size: tuple[int, int]) -> int | None:
        """Images per network call for (h, w) inputs (None: the whole batch); see ``micro_batch``."""
        return micro_batch_for(size) if self.micro_batch == "auto" else self.micro_batch

    def _scratch(self, images: torch.Tensor, step: int) -> torch.Tensor:
        """A :meth:`normalize` buffer for ``step`` of ``images`` at a time."""
        return torch.empty((step, *images.shape[1:]), device=images.device)

    def _downscale(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Antialiased bilinear resize of (B, C, H, W) to ``size`` (see also :meth:`resize_matrices`)."""
        if (int(x.shape[-2]), int(x.shape[-1])) == tuple(size):
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)

    def resize_matrices(self, size_in: tuple[int, int], size_out: tuple[int, int], device: torch.device | str = "cpu",
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols^T) such that rows @ x @ cols^T is :meth:`_downscale` from ``size_in`` to
        ``size_out``: the same linear map as two matrix products (what an export writes, since ONNX's
        Resize filters differently from torch)."""
        return (resize_matrix(size_in[0], size_out[0]).to(device),
                resize_matrix(size_in[1], size_out[1]).T.contiguous().to(device))

    def grids(self, size: tuple[int, int]) -> list[tuple[int, int]]:
        """The (h, w) feature grid of each scale for ``size`` inputs: its finest tap's."""
        return [taps[0] for taps in self.tap_grids(size)]

    def tap_grids(self, size: tuple[int, int]) -> list[list[tuple[int, int]]]:
        """Per scale, the (h, w) grid of every tap of the network, in tap order, for ``size`` inputs
        (one probe per scale, kept)."""
        return [list(taps[:self.taps_count]) for taps in self._probe(size)]

    def deep_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """The (h, w) grid of the deep tap for ``size`` inputs (see ``deep``)."""
        if not self.deep_channels:
            raise ValueError("this extractor has no deep tap")
        return self._probe(size)[self.deep_level][self.taps_count]

    @torch.inference_mode()
    def _probe(self, size: tuple[int, int]) -> list[list[tuple[int, int]]]:
        size = (int(size[0]), int(size[1]))
        if size not in self._grids:
            probe = torch.zeros(1, 3, 1, 1, device=self.mean.device)
            self._grids[size] = []
            for hw in self.level_sizes(size):
                taps = self.net(probe.expand(1, 3, *hw))
                taps = [*taps, self.net.head(taps[-1])] if self.deep_channels else taps
                self._grids[size].append([tuple(t.shape[-2:]) for t in taps])
        return self._grids[size]

    def features(self, x: torch.Tensor, deep: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Normalized float (B, 3, H, W) -> (B, d, H/4, W/4) embeddings (channels-last) of one scale,
        the deepest tap's channels first (see :meth:`block_layouts` for why); the deep tap's maps
        appended to ``deep`` if given."""
        raw = self._run(x, deep)
        size = raw[0].shape[-2:]
        # nearest (the PaDiM reference) keeps each deep feature constant over the finer patches
        # it covers; bilinear blends neighbouring deep features
        kwargs = {"align_corners": False} if self.tap_resize == "bilinear" else {}
        maps = [t if t.shape[-2:] == size else F.interpolate(t, size=size, mode=self.tap_resize, **kwargs)
                for t in self._kept(raw)]
        return torch.cat(maps, dim=1)

    def _run(self, x: torch.Tensor, deep: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """The network's taps of normalized ``x``; its deep tap (the head on from the last tap, only
        here), pooled, appended to ``deep``."""
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.bfloat16):
            raw = self.net(x.contiguous(memory_format=torch.channels_last))
            head = self.net.head(raw[-1]) if self.deep_channels and deep is not None else None
        if head is not None:
            deep.append(self._pooled(head.float()))
        return [t.float() for t in raw] if self.bfloat16 else raw

    @contextlib.contextmanager
    def float32(self) -> Iterator[FeatureExtractor]:
        """Within the block, the network runs in float32 whatever ``feature_dtype`` says: for an
        export, whose runtimes have no bfloat16 convolutions. It changes this extractor, which its
        model shares: not for a model that scores images on another thread meanwhile."""
        kept, self.bfloat16 = self.bfloat16, False
        try:
            yield self
        finally:
            self.bfloat16 = kept

    def _pooled(self, tap: torch.Tensor) -> torch.Tensor:
        if self.pool == 1:
            return tap
        return F.avg_pool2d(tap, self.pool, stride=1, padding=self.pool // 2, count_include_pad=False)

    def _kept(self, taps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The network's taps -> the kept channels of each at its own resolution, pooled,
        channels-last, deepest tap first; taps that keep no channel are left out."""
        out = []
        for i in reversed(range(len(taps))):
            tap, keep = taps[i], getattr(self, f"tap{i}")
            if keep.numel() == 0:  # a small d may draw no channel from a tap
                continue
            if keep.numel() < tap.shape[1]:
                # index_select returns NCHW; pooling and resizing run several times faster channels-last
                tap = tap.index_select(1, keep).contiguous(memory_format=torch.channels_last)
            out.append(self._pooled(tap))
        return out

    # ----------------------------------------------------------------- block layout (nearest)
    def block_layouts(self, size: tuple[int, int]) -> list[ScaleLayout] | None:
        """For ``size`` inputs, the block layout of each scale (see :mod:`padim.backbones.layout`),
        or None when the embeddings have no such structure: ``tap_resize`` is not 'nearest', a tap
        keeps no channel, or a deeper tap's grid does not divide the finest evenly.

        With it, a deep tap's features are the same at every position of a cell, and so are its
        means and covariances. Deepest channels first, the rows of a position's Cholesky-based
        whitening factor that belong to a tap involve only that tap and deeper ones, so they are
        the same across that tap's cell too: statistics and distances can be computed per cell
        (PadimScorer, GaussianStats), about 4x less work than per position at MobileNetV2's taps."""
        if self.tap_resize != "nearest":
            return None
        key = (int(size[0]), int(size[1]))
        if key not in self._layouts:
            layouts = [scale_layout(self.tap_sizes(), taps[::-1]) for taps in self.tap_grids(key)]
            self._layouts[key] = None if any(lay is None for lay in layouts) else layouts
        return self._layouts[key]

    def tap_sizes(self) -> list[int]:
        """Channels kept of each tap, deepest first (the embedding's order)."""
        return [getattr(self, f"tap{i}").numel() for i in range(self.taps_count)][::-1]

    def block_buffer(self, batch_size: int, size: tuple[int, int]) -> list[list[torch.Tensor]]:
        """Empty ``out`` buffers for :meth:`blocks`: per scale, per tap, (cells, batch_size, channels)."""
        return [[torch.empty(lv.cells, batch_size, lv.channels, device=self.mean.device) for lv in lay.levels]
                for lay in self._checked_layouts(size)]

    def blocks(self, images: torch.Tensor, out: list[list[torch.Tensor]] | None = None,
               deep: list[torch.Tensor] | None = None) -> list[list[torch.Tensor]]:
        """uint8 (B, 3, H, W) -> per scale, per tap (deepest first), the (cells, B, channels) tap
        embeddings, cells row by row: the embedding of :meth:`forward` with each deep feature kept
        once per cell instead of once per finest position (only where :meth:`block_layouts` is not
        None). ``out``: buffers from :meth:`block_buffer` with room for B images, written and
        returned as views. ``deep``: as in :meth:`forward`."""
        size = (int(images.shape[-2]), int(images.shape[-1]))
        self._checked_layouts(size)
        b = images.shape[0]
        out = out if out is not None else self.block_buffer(b, size)
        step = self.step(size) or b
        scratch = self._scratch(images, step)
        for start, chunk in zip(range(0, b, step), images.split(step), strict=True):
            chunk = self.normalize(chunk, scratch)
            for k, (hw, bufs) in enumerate(zip(self.level_sizes(size), out, strict=True)):
                x = self._downscale(chunk, hw)
                taps = self._kept(self._run(x, deep if k == self.deep_level else None))
                for tap, buf in zip(taps, bufs, strict=True):
                    target = buf[:, start:start + tap.shape[0]]
                    target.view(*tap.shape[-2:], *target.shape[1:]).copy_(tap.permute(2, 3, 0, 1))
        return [[buf[:, :b] for buf in bufs] for bufs in out]

    def _checked_layouts(self, size: tuple[int, int]) -> list[ScaleLayout]:
        layouts = self.block_layouts(size)
        if layouts is None:
            raise ValueError(f"the embeddings of {size[0]}x{size[1]} inputs have no block layout "
                             f"(tap_resize {self.tap_resize!r}); use forward()")
        return layouts
