"""padim.datasets.prefetch: training images decoded while the command starts, as the fit decodes them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from conftest import make_folder_dataset, texture, write_png
from padim import Padim
from padim.datasets.images import read_image
from padim.datasets.prefetch import Prefetch, can_prefetch

SIZE = (48, 64)


def _images(tmp_path: Path, rng: np.random.Generator, n: int = 5) -> list[Path]:
    paths = []
    for i in range(n):  # PNG and JPEG, of other sizes than the model's
        image = texture(rng, 80 + 8 * i)
        if i % 2:
            paths.append(tmp_path / f"{i}.jpg")
            Image.fromarray(image).save(paths[-1], quality=90)
        else:
            paths.append(write_png(tmp_path / f"{i}.png", image))
    return paths


def _finished(prefetch: Prefetch) -> Prefetch:
    prefetch.process.join()  # decoded all it could: the test does not race it
    return prefetch


def test_prefetched_images_are_the_fits_own_decode(tmp_path, rng):
    paths = _images(tmp_path, rng)
    taken = _finished(Prefetch(paths, SIZE)).take(SIZE)
    assert len(taken) == len(paths)
    for got, path in zip(taken, paths, strict=True):
        assert isinstance(got, np.ndarray) and got.shape == (*SIZE, 3) and got.dtype == np.uint8
        assert np.array_equal(got, np.asarray(read_image(path, SIZE)))


def test_a_bad_file_stops_the_prefetch_and_is_left_to_the_fit(tmp_path, rng):
    paths = _images(tmp_path, rng)
    paths[2].write_bytes(b"not an image")
    taken = _finished(Prefetch(paths, SIZE)).take(SIZE)
    assert [isinstance(x, np.ndarray) for x in taken] == [True, True, False, False, False]
    assert taken[2:] == paths[2:]  # the fit decodes them and names the bad one in its error


def test_prefetch_holds_at_most_max_bytes_and_only_the_models_size(tmp_path, rng):
    paths = _images(tmp_path, rng)
    taken = _finished(Prefetch(paths, SIZE, max_bytes=2 * SIZE[0] * SIZE[1] * 3 + 5)).take(SIZE)
    assert [isinstance(x, np.ndarray) for x in taken] == [True, True, False, False, False]
    assert _finished(Prefetch(paths, SIZE)).take((SIZE[1], SIZE[0])) == paths  # another size: nothing taken


def test_taking_early_stops_the_decoding_process(tmp_path, rng):
    paths = _images(tmp_path, rng, 40)
    prefetch = Prefetch(paths, SIZE)
    taken = prefetch.take(SIZE)
    assert not prefetch.process.is_alive()
    n = sum(isinstance(x, np.ndarray) for x in taken)
    assert taken[n:] == paths[n:] and all(isinstance(x, np.ndarray) for x in taken[:n])


def test_a_fit_on_prefetched_images_equals_the_fit_on_the_files(tmp_path, rng):
    paths = _images(tmp_path, rng, 8)
    kwargs = {"image_size": SIZE, "d": 12, "pool": 1, "scales": (1.0,), "num_workers": 0}
    on_files = Padim(**kwargs).fit(paths)
    on_prefetched = Padim(**kwargs).fit(_finished(Prefetch(paths, SIZE)).take(SIZE))
    assert on_prefetched.threshold_ == on_files.threshold_
    a, b = on_files.scorer_.state(torch.float32), on_prefetched.scorer_.state(torch.float32)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_command_line_prefetches_before_torch_is_imported(tmp_path):
    # in fresh processes (here torch is loaded, so a command run in this process never forks), one
    # with the prefetch and one without: the fit takes decoded images, and writes the same bytes
    assert not can_prefetch()  # torch is loaded in this process
    root = make_folder_dataset(tmp_path / "data", np.random.default_rng(0), n_train=10)
    args = ["fit", str(root), "--category", "widget", "--image-size", "64", "--d", "16", "--no-progress",
            "--workers", "0", "--no-stats"]
    probe = ("import sys\nfrom padim.datasets import prefetch\ntake = prefetch.Prefetch.take\n"
             "def counted(self, size):\n    out = take(self, size)\n"
             "    print('TAKEN', sum(not isinstance(x, str) and hasattr(x, 'shape') for x in out), len(out))\n"
             "    return out\nprefetch.Prefetch.take = counted\n"
             "if sys.argv[1] == 'off':\n    prefetch.can_prefetch = lambda: False\n"
             "from padim.cli import main\nmain(sys.argv[2:])")
    taken = {}
    for mode in ("on", "off"):
        out = subprocess.run([sys.executable, "-c", probe, mode, *args, "--out", str(tmp_path / mode)],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        taken[mode] = [line.split() for line in out.stdout.splitlines() if line.startswith("TAKEN")]
    assert taken["off"] == [] and int(taken["on"][0][2]) == 10 and int(taken["on"][0][1]) > 0, taken
    on, off = ((tmp_path / mode / "model.safetensors").read_bytes() for mode in ("on", "off"))
    assert on == off  # the same fit gives the same bytes
