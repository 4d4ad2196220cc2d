"""Shared fixtures: synthetic images and data sets made in the test, and the real VisA data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

VISA_ROOT = Path(os.environ.get("PADIM_VISA_ROOT", Path(__file__).resolve().parents[2] / "shared" / "data" / "visa"))


def texture(rng: np.random.Generator, size: int = 64, defect: bool = False) -> np.ndarray:
    """A normal-looking stripe texture with noise; ``defect`` paints a bright blob at a random spot."""
    yy, xx = np.mgrid[0:size, 0:size]
    base = 120 + 40 * np.sin(xx / 3.0) + rng.normal(0, 6, (size, size))
    image = np.stack([base, base * 0.8 + 20, base * 0.6 + 40], axis=2)
    if defect:
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        r = size // 8
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        image[blob] = [250, 30, 30]
    return np.clip(image, 0, 255).astype(np.uint8)


def defect_mask(image: np.ndarray) -> np.ndarray:
    """The painted blob of :func:`texture` as a bool mask."""
    return (image[..., 0] == 250) & (image[..., 1] == 30)


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def make_folder_dataset(root: Path, rng: np.random.Generator, n_train: int = 12, n_good: int = 4,
                        n_bad: int = 4, mvtec: bool = True, size: int = 64) -> Path:
    """A tiny MVTec-style (or plain) data set under ``root/widget``."""
    base = root / "widget"
    for i in range(n_train):
        write_png(base / "train" / "good" / f"{i:03d}.png", texture(rng, size))
    for i in range(n_good):
        write_png(base / "test" / "good" / f"{i:03d}.png", texture(rng, size))
    for i in range(n_bad):
        image = texture(rng, size, defect=True)
        write_png(base / "test" / "blob" / f"{i:03d}.png", image)
        name = f"{i:03d}_mask.png" if mvtec else f"{i:03d}.png"
        write_png(base / "ground_truth" / "blob" / name, defect_mask(image).astype(np.uint8) * 255)
    return root


def make_visa_dataset(root: Path, rng: np.random.Generator, n_normal: int = 14, n_anomaly: int = 6,
                      size: int = 64) -> Path:
    """A tiny data set in VisA's own layout, category ``widget``, with its split and annotation csv."""
    cat = root / "widget"
    anno = ["image,label,mask"]
    split = ["object,split,label,image,mask"]
    for i in range(n_normal):
        rel = f"widget/Data/Images/Normal/{i:03d}.JPG"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(texture(rng, size)).save(root / rel, format="JPEG", quality=95)
        anno.append(f"{rel},normal,")
        split.append(f"widget,{'train' if i < n_normal - 4 else 'test'},normal,{rel},")
    for i in range(n_anomaly):
        rel = f"widget/Data/Images/Anomaly/{i:03d}.JPG"
        mrel = f"widget/Data/Masks/Anomaly/{i:03d}.png"
        image = texture(rng, size, defect=True)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / rel, format="JPEG", quality=95)
        write_png(root / mrel, defect_mask(image).astype(np.uint8) * 3)  # class ids, not 255
        label = '"blob,scratch"' if i % 2 else "blob"
        anno.append(f"{rel},{label},{mrel}")
        split.append(f"widget,test,anomaly,{rel},{mrel}")
    (cat / "image_anno.csv").write_text("\n".join(anno) + "\n")
    (root / "split_csv").mkdir(exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(split) + "\n")
    return root


@pytest.fixture
def visa_root() -> Path:
    """The real VisA data; fails (not skips) under CI when it is missing."""
    if not (VISA_ROOT / "fryum" / "Data" / "Images").is_dir():
        message = f"real VisA fryum data not found at {VISA_ROOT}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return VISA_ROOT


def require(module: str):
    """Import an optional dependency the test needs; fail under CI when it is missing, else skip."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        message = f"{module} is not installed (make install installs the test, onnx and serve extras)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def fryum_small(tmp_path_factory):
    """A small real model: 128 px, fitted on 40 fryum training images and saved; with the test split.
    Its image score is the map's: 40 images are too few for the deep score's 160-channel Gaussians.

    Returns (model path, test samples). Shared by the export and service tests (fit once)."""
    if not (VISA_ROOT / "fryum" / "Data" / "Images").is_dir():
        message = f"real VisA fryum data not found at {VISA_ROOT}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from padim import Padim
    from padim.datasets import load_split

    split = load_split(VISA_ROOT, "fryum")
    model = Padim(image_size=128, num_workers=0, image_score="map").fit([s.path for s in split.train[:40]])
    path = model.save(tmp_path_factory.mktemp("fryum_small") / "model.safetensors")
    return path, split.test


REAL_DATA_FIXTURES = {"visa_root", "fryum_small"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that reads the real data as ``real_data``, so ``make test-fast`` (``-m "not
    real_data and not browser"``) leaves it out, however it reaches the data."""
    for item in items:
        if REAL_DATA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_data)


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-extensions", "--window-size=1280,900"]


@pytest.fixture
def driver():
    """A headless Chromium (selenium) for pages written to disk; fails when it is not installed."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.fail("chromium/chromedriver missing: run scripts/ensure-chromium.sh (make test does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in BROWSER_FLAGS:
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield browser
    finally:
        browser.quit()
