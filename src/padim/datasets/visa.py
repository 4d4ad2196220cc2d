"""VisA as distributed: ``<root>/<category>/Data/...``, ``<root>/<category>/image_anno.csv``,
``<root>/split_csv/1cls.csv``. Read in place, never copied."""

from __future__ import annotations

import csv
from pathlib import Path

from .samples import NORMAL, DatasetError, Sample, Split

# the official archive (Registry of Open Data on AWS) and its sha256, as anomalib pins it
VISA_URL = "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar"
VISA_SHA256 = "2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362"
SPLITS = ("1cls", "seed")
SEED_TRAIN_COUNT = 100  # the seed notebook trained on the first 100 normal images


def is_visa(root: Path, category: str) -> bool:
    """True when ``root/category`` looks like a VisA category folder."""
    return (root / category / "Data" / "Images").is_dir()


def _read_csv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a csv with the line each starts on; the header must name the ``required`` columns."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    rows = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise DatasetError(f"{path}: header lacks column(s) {', '.join(missing)}; expected a header "
                                   f"line naming {','.join(required)}")
            line = reader.line_num + 1
            for row in reader:
                rows.append((line, row))
                line = reader.line_num + 1
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: not a readable CSV file ({exc}); re-save it as UTF-8 csv") from exc
    return rows


def _broken(path: Path, line: int, row: dict, why: str) -> DatasetError:
    shown = ",".join("" if v is None else str(v) for k, v in row.items() if k is not None)
    return DatasetError(f"{path} line {line}: {why} ({shown!r}); fix or delete the row")


def read_annotations(root: Path, category: str) -> dict[str, tuple[str, ...]]:
    """Map each image path (relative to root, as in the csv) to its defect types (empty for normal)."""
    path = root / category / "image_anno.csv"
    anno: dict[str, tuple[str, ...]] = {}
    for line, row in _read_csv(path, ("image", "label")):
        image, label = row.get("image"), row.get("label")
        if not image or label is None:
            raise _broken(path, line, row, "row without an image or a label")
        types = tuple(t.strip() for t in label.split(",") if t.strip())
        anno[image] = () if types == (NORMAL,) else types
    return anno


def _sample(root: Path, image: str, mask: str | None, label: int, anno: dict) -> Sample:
    defects = anno.get(image, ()) if label else ()
    if label and not defects:
        defects = ("anomaly",)
    return Sample(root / image, label, defects, (root / mask) if mask else None)


def _check_exist(samples: list[Sample], source: Path) -> None:
    missing = [s.path for s in samples if not s.path.is_file()]
    missing += [s.mask for s in samples if s.mask is not None and not s.mask.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DatasetError(f"{source} names {len(missing)} missing file(s): {shown}{more}; check that DATA_ROOT "
                           "is the folder holding split_csv/, or restore the files")


def load_visa(root: Path, category: str, split: str = "1cls") -> Split:
    """Load a VisA category with the official split (``1cls``) or the seed protocol (``seed``)."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} for VisA; choose one of {', '.join(SPLITS)}")
    anno = read_annotations(root, category)
    if split == "1cls":
        source = root / "split_csv" / "1cls.csv"
        train, test = [], []
        for line, row in _read_csv(source, ("object", "split", "label", "image")):
            if row.get("object") != category:
                continue
            kind, label = row.get("split"), row.get("label")
            if None in row:
                raise _broken(source, line, row, "more fields than the header names")
            if kind not in ("train", "test") or label not in ("normal", "anomaly") or not row.get("image"):
                raise _broken(source, line, row, "expected split train|test, label normal|anomaly and an image")
            sample = _sample(root, row["image"], row.get("mask") or None, int(label == "anomaly"), anno)
            (train if kind == "train" else test).append(sample)
        if not train:
            raise DatasetError(f"{source}: no rows for category {category!r}")
        _check_exist(train + test, source)
        return Split(train, test, "visa", "1cls")

    images = root / category / "Data" / "Images"
    normal = sorted((images / "Normal").glob("*.JPG"))
    anomalous = sorted((images / "Anomaly").glob("*.JPG"))
    if not normal or not anomalous:
        raise DatasetError(f"{images}: expected JPG files in Normal/ and Anomaly/")
    masks = root / category / "Data" / "Masks" / "Anomaly"
    train = [Sample(p, 0) for p in normal[:SEED_TRAIN_COUNT]]
    test = []
    for p in anomalous:
        rel = p.relative_to(root).as_posix()
        mask = masks / f"{p.stem}.png"
        test.append(Sample(p, 1, anno.get(rel) or ("anomaly",), mask if mask.is_file() else None))
    note = (
        f"seed split: first {len(train)} normal images for training, all {len(test)} anomalous "
        "images as the test set; image-level metrics are undefined without normal test images"
    )
    return Split(train, test, "visa", "seed", [note])
