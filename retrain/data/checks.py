"""The layout, checks and warnings of a dataset, and the manifest that records them.

The layout is class folders, one wrapper folder, or ``train/ val|validation/ test/`` split
folders. Every image is verified by decoding it; junk is skipped and reported; input that
cannot make a classifier raises `DatasetError` and input that makes a poor one gets a
warning. The result is a ``manifest.json`` whose ``dataset_id`` is a hash of the content,
so the same images give the same id and reuse the extraction and the cache.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from retrain.data.dataset import (
    _CHUNK,
    IMAGE_EXTENSIONS,
    Dataset,
    Progress,
    _max_file_bytes,
    _max_pixels,
)
from retrain.data.images import _check_chunk, _map_chunks, _nfc
from retrain.errors import DatasetError
from retrain.sessions.workspace import write_json

SPLITS: tuple[str, ...] = ("train", "val", "test")
MIN_IMAGES_PER_CLASS = 2
FEW_IMAGES_PER_CLASS = 10
IMBALANCE_RATIO = 3.0
TINY_SIDE = 32
MANIFEST_VERSION = 1

#: Codes of the dataset warnings (`Dataset.warning_codes`): code -> when it is given.
WARNING_CODES: dict[str, str] = {
    "few_images": f"a class has fewer than {FEW_IMAGES_PER_CLASS} (training) images",
    "imbalance": f"the largest class has {IMBALANCE_RATIO:g}x or more the images of the smallest",
    "duplicates": "exact copies of an image in the same class",
    "duplicates_across_classes": "the same image in more than one class",
    "duplicates_across_splits": "the same image in more than one split (leakage)",
    "tiny_images": f"images smaller than {TINY_SIDE} px on a side",
    "skipped_files": "files that were not used (besides routine system files)",
}
# Manifests written before warnings had codes: the code of a message, by how it is worded.
_LEGACY_WARNING_TEXT = (
    ("imbalance", "Classes are imbalanced"),
    ("duplicates_across_splits", "in more than one split"),
    ("duplicates_across_classes", "in more than one class"),
    ("duplicates", "exact cop"),
    ("tiny_images", " px on a side"),
    ("skipped_files", "skipped ("),
    ("few_images", " has only "),
    ("few_images", " classes have fewer than "),
)

# Folder names (lower case) that mean a split; anything else at the top is a class.
_SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "test": "test"}


# --------------------------------------------------------------------------------------
# Layout, checks, warnings


def _find_layout(
    candidates: list[str], label: str
) -> tuple[str, dict[str, dict[str, list[str]]], list[dict]]:
    """Return ``(prefix, split -> class -> relative paths, skipped)`` for candidate images.

    ``prefix`` is the wrapper folder(s) to strip; paths in the result are relative to it.
    """
    if not candidates:
        raise DatasetError(
            f"No images found in '{label}'. Allowed formats: {' '.join(IMAGE_EXTENSIONS)}"
        )
    paths = list(candidates)
    prefix = ""
    # Strip wrapper folders: one folder at the top, no images beside it, folders inside it.
    while True:
        tops = {p.split("/", 1)[0] for p in paths if "/" in p}
        loose = [p for p in paths if "/" not in p]
        if loose or len(tops) != 1:
            break
        top = tops.pop()
        if not any(p.count("/") >= 2 for p in paths):
            break  # the single folder holds images directly: it is a class, not a wrapper
        prefix += top + "/"
        paths = [p[len(top) + 1 :] for p in paths]

    skipped: list[dict] = []
    groups: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    split_dirs = {
        p.split("/", 1)[0]
        for p in paths
        if p.count("/") >= 2 and p.split("/", 1)[0].lower() in _SPLIT_ALIASES
    }
    if split_dirs:
        by_split: dict[str, list[str]] = defaultdict(list)
        for d in split_dirs:
            by_split[_SPLIT_ALIASES[d.lower()]].append(d)
        for split, dirs in by_split.items():
            if len(dirs) > 1:
                raise DatasetError(
                    f"Found {' and '.join(sorted(d + '/' for d in dirs))} in '{label}': both mean "
                    f"the '{split}' split. Merge them into one folder."
                )
        for p in paths:
            parts = p.split("/")
            split = _SPLIT_ALIASES.get(parts[0].lower())
            if split is None or parts[0] not in split_dirs:
                skipped.append({"path": prefix + p, "reason": "outside the train/val/test folders"})
            elif len(parts) < 3:
                skipped.append(
                    {
                        "path": prefix + p,
                        "reason": f"image directly in '{parts[0]}/', not in a class folder",
                    }
                )
            else:
                groups[split][_nfc(parts[1])].append(p)
        if "train" not in groups:
            found = ", ".join(sorted(d + "/" for d in split_dirs))
            raise DatasetError(
                f"Found split folders {found} but no train/ folder in '{label}'. Add "
                "train/<class>/ folders, or zip plain class folders and a validation split "
                "is made for you."
            )
    else:
        loose = [p for p in paths if "/" not in p]
        for p in paths:
            if "/" in p:
                groups["train"][_nfc(p.split("/", 1)[0])].append(p)
        if not groups:
            raise DatasetError(
                f"Found {len(loose)} images in '{label}' but no class folders. Put each class's "
                "images in its own folder (e.g. cats/1.jpg, dogs/1.jpg) and zip those folders."
            )
        skipped.extend(
            {"path": prefix + p, "reason": "image outside any class folder"} for p in loose
        )
    return prefix, {s: dict(c) for s, c in groups.items()}, skipped


def _check_classes(label: str, groups: dict[str, dict[str, list]]) -> list[str]:
    """Raise DatasetError for class structures that cannot train; return the class names."""
    train_classes = set(groups.get("train", {}))
    for split in SPLITS[1:]:
        if split not in groups:
            continue
        other = set(groups[split])
        if other != train_classes:
            parts = []
            missing = sorted(train_classes - other)
            extra = sorted(other - train_classes)
            if missing:
                parts.append(f"{split}/ lacks {', '.join(repr(c) for c in missing)}")
            if extra:
                parts.append(f"{split}/ has {', '.join(repr(c) for c in extra)} that train/ lacks")
            raise DatasetError(
                f"The split folders of '{label}' have different classes: {'; '.join(parts)}. "
                "Every split needs the same class folders (with at least one image each)."
            )
    if len(train_classes) < 2:
        only = next(iter(train_classes), "")
        n = len(groups.get("train", {}).get(only, []))
        raise DatasetError(
            f"Found only 1 class ('{only}', {n} images) in '{label}'; a classifier needs at "
            "least 2 classes. Put each class's images in its own folder (e.g. cats/, dogs/)."
        )
    for name in sorted(train_classes):
        n = len(groups["train"][name])
        if n < MIN_IMAGES_PER_CLASS:
            where = " in train/" if len(groups) > 1 else ""
            raise DatasetError(
                f"Class '{name}' has only {n} usable image{where}; every "
                f"class needs at least {MIN_IMAGES_PER_CLASS} (10 or more recommended). Add "
                "images to it or remove its folder."
            )
    return sorted(train_classes)


def _skip_category(reason: str) -> str:
    return reason.split(" (")[0].split(":")[0]


def _n(count: int, one: str, many: str) -> str:
    return f"{count:,} {one if count == 1 else many}"


def _warnings(
    class_names: list[str],
    groups: dict[str, dict[str, list[str]]],
    info: dict[str, tuple[str, int, int]],
    skipped: list[dict],
) -> list[tuple[str, str]]:
    """Problems that do not stop training, each with concrete advice: ``(code, message)``."""
    out: list[tuple[str, str]] = []
    multi = len(groups) > 1
    train = {c: len(groups["train"][c]) for c in class_names}
    few = [(c, n) for c, n in train.items() if n < FEW_IMAGES_PER_CLASS]
    where = "training images" if multi else "images"
    if len(few) == 1:
        c, n = few[0]
        out.append(
            (
                "few_images",
                f"Class '{c}' has only {n} {where}; add at least {FEW_IMAGES_PER_CLASS} "
                "(50 or more works much better).",
            )
        )
    elif few:
        listed = ", ".join(f"'{c}': {n}" for c, n in few[:6]) + (", ..." if len(few) > 6 else "")
        out.append(
            (
                "few_images",
                f"{len(few)} classes have fewer than {FEW_IMAGES_PER_CLASS} {where} ({listed}); "
                f"add at least {FEW_IMAGES_PER_CLASS} per class (50 or more works much better).",
            )
        )
    big = max(train, key=lambda c: train[c])
    small = min(train, key=lambda c: train[c])
    if train[big] >= IMBALANCE_RATIO * train[small]:
        out.append(
            (
                "imbalance",
                f"Classes are imbalanced: '{big}' has {train[big]} {where} but '{small}' only "
                f"{train[small]} ({train[big] / train[small]:.1f}x). Add images to the smaller "
                "classes, or turn on class weights when training.",
            )
        )

    by_hash: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for split in (s for s in SPLITS if s in groups):
        for cls, rels in groups[split].items():
            for rel in rels:
                by_hash[info[rel][0]].append((split, cls, rel))
    within: list[tuple[str, str]] = []
    across_classes: list[tuple[str, str]] = []
    across_splits: list[tuple[str, str]] = []
    for copies in by_hash.values():
        if len(copies) < 2:
            continue
        first = copies[0]
        for other in copies[1:]:
            pair = (first[2], other[2])
            if other[0] != first[0]:
                across_splits.append(pair)
            elif other[1] != first[1]:
                across_classes.append(pair)
            else:
                within.append(pair)
    if within:
        a, b = within[0]
        out.append(
            (
                "duplicates",
                f"{_n(len(within), 'image is an exact copy', 'images are exact copies')} of "
                "another image in the same class "
                f"(e.g. '{a}' = '{b}'); copies count twice in training. Delete the copies.",
            )
        )
    if across_classes:
        a, b = across_classes[0]
        out.append(
            (
                "duplicates_across_classes",
                f"{_n(len(across_classes), 'image appears', 'images appear')} in more than one "
                f"class (e.g. '{a}' = '{b}'); "
                "the same picture with two labels confuses the model. Keep each in one class.",
            )
        )
    if across_splits:
        a, b = across_splits[0]
        out.append(
            (
                "duplicates_across_splits",
                f"{_n(len(across_splits), 'image appears', 'images appear')} in more than one "
                f"split (e.g. '{a}' = '{b}'): "
                "test images seen in training make scores look better than they are (leakage). "
                "Remove them from one split.",
            )
        )

    tiny = [
        (rel, info[rel][1], info[rel][2])
        for classes in groups.values()
        for rels in classes.values()
        for rel in rels
        if min(info[rel][1], info[rel][2]) < TINY_SIDE
    ]
    if tiny:
        rel, w, h = tiny[0]
        out.append(
            (
                "tiny_images",
                f"{_n(len(tiny), 'image is', 'images are')} smaller than {TINY_SIDE} px on a "
                f"side (e.g. '{rel}' is "
                f"{w}x{h}); they get upscaled and look blurry. Use larger images if you have them.",
            )
        )

    if skipped:
        kinds = Counter(_skip_category(s["reason"]) for s in skipped)
        listed = "; ".join(f"{kind}: {n}" for kind, n in kinds.most_common())
        out.append(
            (
                "skipped_files",
                f"{_n(len(skipped), 'file was', 'files were')} skipped ({listed}); see the list "
                "of skipped files. "
                "Fix or remove them if they should be part of the dataset.",
            )
        )
    return out


def _content_id(groups: dict[str, dict[str, list[str]]], info: dict[str, tuple]) -> str:
    digest = hashlib.sha256(f"retrain-dataset-v{MANIFEST_VERSION}\n".encode())
    for split in SPLITS:
        for cls in sorted(groups.get(split, {})):
            for rel in sorted(groups[split][cls]):
                digest.update(f"{split}\t{cls}\t{rel}\t{info[rel][0]}\n".encode())
    return digest.hexdigest()[:16]


def _scan(
    root: Path,
    candidates: list[str],
    skipped: list[dict],
    junk: list[dict],
    label: str,
    progress: Progress | None,
    start: float,
) -> dict[str, Any]:
    """Layout -> decode check -> class checks -> warnings; return the manifest's content."""
    prefix, groups, layout_skips = _find_layout(candidates, label)
    skipped = skipped + layout_skips
    base = root / prefix if prefix else root
    rels = sorted(rel for classes in groups.values() for rels in classes.values() for rel in rels)

    pixel_limit = _max_pixels()
    max_bytes = _max_file_bytes()
    chunks = [
        ([str(base / r) for r in rels[i : i + _CHUNK]], pixel_limit, max_bytes)
        for i in range(0, len(rels), _CHUNK)
    ]
    done = [0]

    def report(n: int) -> None:
        done[0] += n
        if progress:
            frac = start + (1.0 - start) * done[0] / max(len(rels), 1)
            progress(min(frac, 1.0), f"Checking images {done[0]:,}/{len(rels):,}")

    sizes = [len(c[0]) for c in chunks]
    results = [r for chunk in _map_chunks(_check_chunk, chunks, sizes, report) for r in chunk]
    info: dict[str, tuple[str, int, int]] = {}
    for rel, (digest, width, height, problem) in zip(rels, results, strict=True):
        if problem:
            skipped.append({"path": prefix + rel, "reason": problem})
        else:
            info[rel] = (digest or "", width, height)
    if not info:
        examples = "; ".join(f"'{s['path']}': {s['reason']}" for s in skipped[:2])
        raise DatasetError(
            f"No readable images found in '{label}' ({len(skipped)} files skipped, e.g. "
            f"{examples}). Allowed formats: {' '.join(IMAGE_EXTENSIONS)}"
        )
    groups = {
        split: {c: sorted(r for r in rs if r in info) for c, rs in classes.items()}
        for split, classes in groups.items()
    }
    groups = {
        split: {c: rs for c, rs in classes.items() if rs} for split, classes in groups.items()
    }
    class_names = _check_classes(label, groups)
    warns = _warnings(class_names, groups, info, skipped)
    index = {c: i for i, c in enumerate(class_names)}
    splits = {
        split: [(rel, index[c]) for c in class_names for rel in groups[split][c]]
        for split in SPLITS
        if split in groups
    }
    return {
        "dataset_id": _content_id(groups, info),
        "prefix": prefix,
        "class_names": class_names,
        "splits": splits,
        "skipped": skipped + junk,
        "warnings": [message for _, message in warns],
        "warning_codes": [code for code, _ in warns],
        "image_sizes": _size_stats(info),
    }


def _size_stats(info: dict[str, tuple[str, int, int]]) -> dict[str, int]:
    widths = [w for _, w, _ in info.values()]
    heights = [h for _, _, h in info.values()]
    return {
        "min_width": min(widths),
        "min_height": min(heights),
        "median_width": int(np.median(widths)),
        "median_height": int(np.median(heights)),
        "max_width": max(widths),
        "max_height": max(heights),
    }


# --------------------------------------------------------------------------------------
# Manifest


def _write_manifest(
    folder: Path, scan: dict[str, Any], name: str, root: Path, source: Path
) -> Dataset:
    manifest_path = folder / "manifest.json"
    try:
        stored_root = root.relative_to(folder).as_posix()  # inside the workspace: relocatable
    except ValueError:
        stored_root = str(root)
    counts = {
        split: dict(Counter(scan["class_names"][label] for _, label in items))
        for split, items in scan["splits"].items()
    }
    data = {
        "version": MANIFEST_VERSION,
        "dataset_id": scan["dataset_id"],
        "name": name,
        "root": stored_root,
        "source": str(source),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "class_names": scan["class_names"],
        "counts": counts,
        "num_images": sum(len(v) for v in scan["splits"].values()),
        "image_sizes": scan["image_sizes"],
        "splits": {
            s: [[rel, label] for rel, label in items] for s, items in scan["splits"].items()
        },
        "skipped": scan["skipped"],
        "warnings": scan["warnings"],
        "warning_codes": scan["warning_codes"],
    }
    write_json(manifest_path, data)
    return load_dataset(manifest_path)


def _warning_codes(manifest: dict[str, Any]) -> list[str]:
    """The manifest's warning codes; for a manifest written before codes, told from the text."""
    messages = [str(w) for w in manifest.get("warnings", [])]
    codes = manifest.get("warning_codes")
    if isinstance(codes, list) and len(codes) == len(messages):
        return [str(c) for c in codes]
    return [
        next((code for code, text in _LEGACY_WARNING_TEXT if text in message), "")
        for message in messages
    ]


def load_dataset(manifest_path: str | Path) -> Dataset:
    """Read a dataset back from its ``manifest.json``.

    Raises:
        DatasetError: the manifest is missing or unreadable, or its images are gone.
    """
    path = Path(manifest_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        root = Path(data["root"])
        if not root.is_absolute():
            root = path.parent / root
        dataset = Dataset(
            dataset_id=str(data["dataset_id"]),
            name=str(data["name"]),
            root=root,
            class_names=[str(c) for c in data["class_names"]],
            splits={
                s: [(str(rel), int(label)) for rel, label in items]
                for s, items in data["splits"].items()
            },
            skipped=[dict(s) for s in data.get("skipped", [])],
            warnings=[str(w) for w in data.get("warnings", [])],
            manifest_path=path,
            warning_codes=_warning_codes(data),
        )
    except FileNotFoundError:
        raise DatasetError(f"No dataset manifest at '{path}'. Upload the dataset again.") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DatasetError(
            f"The dataset manifest '{path}' is unreadable ({type(err).__name__}). "
            "Upload the dataset again."
        ) from None
    if not root.is_dir():
        raise DatasetError(
            f"The images of dataset '{dataset.name}' are gone (no folder '{root}'). "
            "Upload the dataset again."
        )
    return dataset
