"""Images to embeddings batch by batch: decoding (in worker processes where it pays), the device,
and the buffers that batches are written into."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..datasets.images import ImageFiles, ImageSource
from .embedding import Embedding

# batches per statistics update, written into one buffer: each update reads and writes all the
# sums, so it is bound by memory traffic at one small batch; a buffer of a few batches stays
# smaller than the sums
STATS_GROUP = 4


def decode_workers(requested: int | None, n_images: int, batch_size: int) -> int:
    """Decoding processes: as requested, else up to 2 when there is more than one batch to decode
    and cores that torch's threads leave free (decoders that compete with torch's threads for the
    same cores slow fit and predict down; see docs/performance.md)."""
    if requested is not None:
        return requested
    spare = (os.cpu_count() or 1) - torch.get_num_threads()
    return max(0, min(2, spare)) if n_images > batch_size else 0


def decoded_batches(files: ImageFiles, batch_size: int, threads: int | None = None) -> Iterator[torch.Tensor]:
    """uint8 (B, 3, H, W) batches of ``files`` in order, each batch decoded on ``threads`` threads
    (default: one per core) before it is handed on. Decoding and resizing release the GIL, so the
    cores that the network leaves idle while this process decodes share the work; between the
    network's calls, nothing competes with its threads (decoding processes would)."""
    threads = min(threads or os.cpu_count() or 1, batch_size, len(files))
    with ThreadPoolExecutor(threads) if threads > 1 else contextlib.nullcontext() as pool:
        get = files.__getitem__
        for start in range(0, len(files), batch_size):
            indices = range(start, min(start + batch_size, len(files)))
            yield torch.stack(list(pool.map(get, indices) if pool is not None else map(get, indices)))


def _shared(images: Sequence[ImageSource]) -> bool:
    """Whether any source is a PIL image: it may be a file opened lazily, which two threads would
    then read at once (paths and arrays decode apart)."""
    return any(isinstance(image, Image.Image) for image in images)


def image_batches(images: Sequence[ImageSource] | torch.Tensor, embedding: Embedding, batch_size: int,
                  num_workers: int | None = None, desc: str = "predict", progress: bool = False, fork: bool = True,
                  buffer_images: int | None = None) -> Iterator[tuple[torch.Tensor, object]]:
    """uint8 (B, 3, H, W) batches on the embedding's device, decoded in worker processes where
    cores are left for them (see :func:`decode_workers`), else in this process: on a thread per
    core, or on this thread alone with ``num_workers=0`` (as Dask's tasks ask, several of which
    share a worker's cores). Each batch comes with the one embedding buffer (of ``buffer_images``
    images, default one batch; None off the CPU or for a lone image) they are all written into."""
    if isinstance(images, torch.Tensor):
        batches = images.split(batch_size)
    else:
        workers = decode_workers(num_workers, len(images), batch_size) if fork else 0
        files = ImageFiles(images, embedding.size)
        batches = (torch.utils.data.DataLoader(files, batch_size=batch_size, num_workers=workers) if workers
                   else decoded_batches(files, batch_size, threads=1 if num_workers == 0 or _shared(images) else None))
    out = None
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        # no buffer for a lone image: predicting one image runs the network once
        if out is None and embedding.device.type == "cpu" and max(len(batch), buffer_images or 0) > 1:
            out = embedding.buffer(buffer_images or batch_size)
        yield batch.to(embedding.device), out


def embedding_groups(images: Sequence[ImageSource] | torch.Tensor, embedding: Embedding, batch_size: int,
                     num_workers: int | None = None, desc: str = "fit", progress: bool = False) -> Iterator[object]:
    """Embedding blocks of up to STATS_GROUP batches of images at a time (one batch at a time off
    the CPU): batch after batch is written into one buffer, handed on when the next would not fit."""
    group = STATS_GROUP * batch_size
    filled, out = 0, None
    for batch, out in image_batches(images, embedding, batch_size, num_workers, desc, progress, buffer_images=group):
        if out is None:
            yield embedding(batch)
            continue
        if filled + len(batch) > group:
            yield embedding.filled(out, filled)
            filled = 0
        embedding(batch, embedding.window(out, filled, group))
        filled += len(batch)
    if filled:
        yield embedding.filled(out, filled)
