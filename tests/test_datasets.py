"""padim.datasets: VisA, MVTec AD and plain layouts, splits, masks, image decoding."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from conftest import make_folder_dataset, make_visa_dataset, write_png
from padim.datasets import DatasetError, detect_layout, load_split, read_image, read_mask


def test_visa_official_split_reads_labels_masks_and_multi_label_types(tmp_path, rng):
    root = make_visa_dataset(tmp_path, rng)
    split = load_split(root, "widget")
    assert split.layout == "visa" and split.name == "1cls"
    assert len(split.train) == 10 and all(s.label == 0 for s in split.train)
    anomalies = [s for s in split.test if s.label == 1]
    assert len(anomalies) == 6 and len(split.test) == 10
    assert all(s.mask is not None and s.mask.is_file() for s in anomalies)
    assert {s.defect_type for s in anomalies} == {"blob", "blob+scratch"}
    assert anomalies[1].defects == ("blob", "scratch")
    assert split.has_image_labels


def test_visa_seed_split_trains_on_first_normals_and_tests_on_anomalies(tmp_path, rng):
    root = make_visa_dataset(tmp_path, rng)
    split = load_split(root, "widget", split="seed")
    assert [s.path.name for s in split.train] == [f"{i:03d}.JPG" for i in range(14)]  # fewer than 100
    assert all(s.label == 1 for s in split.test) and not split.has_image_labels
    assert split.notes and "image-level metrics are undefined" in split.notes[0]


def test_split_csv_naming_a_missing_file_is_an_error_naming_it(tmp_path, rng):
    root = make_visa_dataset(tmp_path, rng)
    (root / "widget/Data/Images/Normal/003.JPG").unlink()
    with pytest.raises(DatasetError, match="003.JPG"):
        load_split(root, "widget")


def test_layout_detection_and_override(tmp_path, rng):
    mvtec = make_folder_dataset(tmp_path / "a", rng, mvtec=True)
    plain = make_folder_dataset(tmp_path / "b", rng, mvtec=False)
    (plain / "widget" / "ground_truth").rename(plain / "widget" / "masks")
    assert detect_layout(mvtec, "widget") == "mvtec"
    assert detect_layout(plain, "widget") == "folder"
    for root in (mvtec, plain):
        split = load_split(root, "widget")
        bad = [s for s in split.test if s.label]
        assert len(split.train) == 12 and len(bad) == 4
        assert all(s.mask is not None for s in bad) and all(s.defects == ("blob",) for s in bad)
    assert load_split(mvtec, "widget", layout="folder").layout == "folder"


def test_missing_category_says_where_to_point(tmp_path):
    with pytest.raises(DatasetError, match="category folder not found"):
        load_split(tmp_path, "fryum")


def test_read_mask_nonzero_class_ids_are_anomalous_and_resize_is_nearest(tmp_path):
    mask = np.zeros((40, 60), np.uint8)
    mask[10:20, 30:50] = 2
    path = write_png(tmp_path / "m.png", mask)
    full = read_mask(path, (40, 60))
    assert full.dtype == bool and full.sum() == 200
    small = read_mask(path, (20, 30))
    assert set(np.unique(small)) <= {False, True} and small.sum() == 50
    assert not read_mask(None, (8, 8)).any()


def test_image_size_of_a_mask_is_as_stored_and_reads_no_pixels(tmp_path, monkeypatch):
    from padim.datasets.images import image_size

    path = tmp_path / "m.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # a rotation read_mask does not apply
    Image.fromarray(np.zeros((40, 60), np.uint8)).save(path, exif=exif)
    assert image_size(path) == (60, 40)
    assert image_size(path, upright=False) == (40, 60) == read_mask(path, (40, 60)).shape
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded the pixels"))
    assert image_size(path, upright=False) == (40, 60)


def test_read_image_converts_modes_and_applies_exif_rotation(tmp_path):
    gray = write_png(tmp_path / "g.png", np.full((10, 20), 77, np.uint8))
    assert np.asarray(read_image(gray)).shape == (10, 20, 3)
    sixteen = tmp_path / "s.png"
    Image.fromarray(np.full((10, 20), 65535, np.uint16)).save(sixteen)
    assert np.asarray(read_image(sixteen)).max() == 255
    rotated = tmp_path / "r.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    pixels = np.random.default_rng(0).integers(0, 256, (10, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(rotated, exif=exif)
    assert read_image(rotated).size == (10, 20)
    assert read_image(rotated, (32, 48)).size == (48, 32)
    with Image.open(rotated) as im:  # the in-place rotation gives the pixels Pillow's copy gives
        assert np.array_equal(np.asarray(read_image(rotated)), np.asarray(ImageOps.exif_transpose(im)))


def test_undecodable_image_error_names_the_file(tmp_path):
    bad = tmp_path / "broken.JPG"
    bad.write_text("not an image")
    with pytest.raises(DatasetError, match="broken.JPG"):
        read_image(bad)


def test_keep_aspect_sizes_the_longer_side_from_the_image(tmp_path):
    from padim.datasets.images import keep_aspect

    wide = write_png(tmp_path / "w.png", np.zeros((1000, 1500), np.uint8))
    tall = write_png(tmp_path / "t.png", np.zeros((1500, 1000), np.uint8))
    assert keep_aspect(384, wide) == (384, 576)
    assert keep_aspect(256, tall) == (384, 256)
    assert keep_aspect(250, wide) == (250, 368)  # 375 rounded to a multiple of 16


def test_images_opened_on_many_threads_refuse_every_bomb_and_leave_the_warning_filters(tmp_path, monkeypatch):
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    paths = [write_png(tmp_path / f"{i}.png", np.full((8, 8, 3), i, np.uint8)) for i in range(32)]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # 64 px: Pillow only warns (1x-2x), the tool refuses

    def refused(path) -> bool:
        try:
            read_image(path, (8, 8))
        except DatasetError as exc:
            return "decompression-bomb" in str(exc)
        return False

    before = list(warnings.filters)
    for _ in range(5):
        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(refused, paths))
    assert warnings.filters == before  # each thread's filters were its own, one at a time
