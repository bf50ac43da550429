"""retrain/data/: safe ingestion, layouts, every fatal and warning path, the image cache."""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrain import data
from retrain.data import (
    Dataset,
    ImageCache,
    ingest,
    ingest_upload,
    load_dataset,
    load_image_file,
    load_images,
    stratified_split,
    thumbnails,
)
from retrain.data import images as decoding
from retrain.errors import ConfigError, DatasetError
from tests.conftest import FLOWERS, needs_flowers

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------
# helpers


def _png(colour=(200, 30, 30), size=(32, 32), mode="RGB", fmt="PNG", seed: int | None = None):
    """Bytes of a small image; ``seed`` adds noise so images differ (no duplicate warnings)."""
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[:] = colour
    if seed is not None:
        rng = np.random.default_rng(seed)
        arr = np.clip(arr.astype(int) + rng.integers(0, 40, arr.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, payload in entries.items():
            zf.writestr(name, payload)
    return path


def _classes(n_per_class=12, classes=("cat", "dog"), prefix="", size=(32, 32)) -> dict:
    """Entries of a valid class-folder dataset whose images are all different."""
    out = {}
    for c, cls in enumerate(classes):
        for i in range(n_per_class):
            out[f"{prefix}{cls}/{i}.png"] = _png((60 * c + 40, 90, 160), size, seed=c * 100 + i)
    return out


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    return tmp_path / "ws"


def _reasons(dataset: Dataset) -> dict[str, str]:
    return {s["path"]: s["reason"] for s in dataset.skipped}


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header claims ``width x height`` pixels."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


# ------------------------------------------------------------------------------------------
# layouts


def test_class_folders_zip(tmp_path, ws, make_image_folder, make_zip):
    folder = make_image_folder(classes=("cat", "dog", "bird"), per_class=12)
    ds = ingest(make_zip(folder), ws)
    assert ds.class_names == ["bird", "cat", "dog"]
    assert ds.counts() == {"train": {"bird": 12, "cat": 12, "dog": 12}}
    assert ds.num_images() == 36
    assert len(ds.dataset_id) == 16 and int(ds.dataset_id, 16) >= 0
    assert ds.name == "images"
    assert ds.manifest_path == ws / "datasets" / ds.dataset_id / "manifest.json"
    assert ds.root == ws / "datasets" / ds.dataset_id / "files"
    for rel, label in ds.splits["train"]:
        assert (ds.root / rel).is_file()
        assert rel.split("/")[0] == ds.class_names[label]
    assert ds.warnings == [] and ds.skipped == []


def test_summary_is_the_cli_json(ws, make_image_folder, make_zip):
    ds = ingest(make_zip(make_image_folder(per_class=12)), ws)
    summary = ds.summary()
    assert set(summary) == {
        "dataset_id",
        "classes",
        "splits",
        "num_images",
        "skipped",
        "warnings",
        "warning_codes",
        "manifest",
    }
    assert summary["splits"] == {"train": {"cat": 12, "dog": 12}}
    assert summary["manifest"] == str(ds.manifest_path)
    manifest = json.loads(ds.manifest_path.read_text())
    assert manifest["dataset_id"] == ds.dataset_id
    assert manifest["class_names"] == ["cat", "dog"]
    assert manifest["counts"] == {"train": {"cat": 12, "dog": 12}}
    assert len(manifest["splits"]["train"]) == 24


def test_folder_is_read_in_place(ws, make_image_folder):
    folder = make_image_folder(per_class=12)
    ds = ingest(folder, ws)
    assert ds.root == folder.resolve()
    assert ds.manifest_path.parent.parent == ws / "datasets"
    assert not (ds.manifest_path.parent / "files").exists()


def test_wrapper_folder_gives_the_same_dataset(tmp_path, ws, make_image_folder, make_zip):
    folder = make_image_folder(per_class=12)
    plain = ingest(make_zip(folder, name="plain.zip"), ws)
    wrapped = ingest(make_zip(folder, arc_prefix="my photos/", name="wrapped.zip"), ws)
    double = ingest(make_zip(folder, arc_prefix="a/b/", name="double.zip"), ws)
    assert wrapped.class_names == plain.class_names == double.class_names == ["cat", "dog"]
    assert wrapped.dataset_id == plain.dataset_id == double.dataset_id
    assert wrapped.root.name == "my photos"


@pytest.mark.parametrize("val_name", ["val", "validation"])
def test_split_folders(ws, make_image_folder, make_zip, val_name):
    folder = make_image_folder(per_class=12, splits=("train", val_name, "test"))
    ds = ingest(make_zip(folder, arc_prefix="wrapper/"), ws)
    assert list(ds.splits) == ["train", "val", "test"]
    assert ds.counts()["val"] == {"cat": 12, "dog": 12}
    assert all(rel.startswith(f"{val_name}/") for rel, _ in ds.splits["val"])


def test_split_class_sets_must_match(ws, tmp_path):
    entries = _classes(prefix="train/") | _classes(classes=("cat", "bird"), prefix="test/")
    with pytest.raises(
        DatasetError, match="different classes: test/ lacks 'dog'; test/ has 'bird'"
    ):
        ingest(_zip(tmp_path / "d.zip", entries), ws)


def test_split_folders_need_train(ws, tmp_path):
    entries = _classes(prefix="val/") | _classes(prefix="test/")
    with pytest.raises(DatasetError, match="no train/ folder"):
        ingest(_zip(tmp_path / "d.zip", entries), ws)


def test_val_and_validation_together_is_an_error(ws, tmp_path):
    entries = _classes(prefix="train/") | _classes(prefix="val/") | _classes(prefix="validation/")
    with pytest.raises(DatasetError, match="both mean the 'val' split"):
        ingest(_zip(tmp_path / "d.zip", entries), ws)


def test_unicode_and_spaces_in_names(ws, tmp_path):
    entries = {}
    for c, cls in enumerate(("café crème", "日本 猫")):
        for i in range(12):
            entries[f"données/{cls}/photo {i} é.png"] = _png(
                (50 + 100 * c, 80, 80), seed=c * 50 + i
            )
    ds = ingest(_zip(tmp_path / "été 2024.zip", entries), ws)
    assert ds.name == "été 2024"
    assert ds.class_names == ["café crème", "日本 猫"]
    cache = load_images(ds, "train", (8, 8))
    assert cache.images.shape == (24, 8, 8, 3)


def test_macos_decomposed_names_are_normalised(ws, tmp_path):
    nfd = "cafe\u0301"  # "café" as macOS writes it
    entries = _classes(classes=(nfd, "tea"))
    ds = ingest(_zip(tmp_path / "d.zip", entries), ws)
    assert ds.class_names == ["café", "tea"]


# ------------------------------------------------------------------------------------------
# fatal input


def test_not_a_zip(ws, tmp_path):
    path = tmp_path / "data.zip"
    path.write_text("hello, I am a text file")
    with pytest.raises(DatasetError, match="'data.zip' is not a zip file"):
        ingest(path, ws)


def test_truncated_zip(ws, tmp_path, make_image_folder, make_zip):
    full = make_zip(make_image_folder(per_class=12)).read_bytes()
    path = tmp_path / "cut.zip"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(DatasetError, match="truncated or damaged zip"):
        ingest(path, ws)


def test_missing_source(ws, tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        ingest(tmp_path / "nope.zip", ws)


def test_no_images(ws, tmp_path):
    path = _zip(tmp_path / "d.zip", {"notes.txt": b"hi", "cats/readme.md": b"# cats"})
    with pytest.raises(DatasetError, match=r"No images found in 'd.zip'. Allowed formats: .jpg"):
        ingest(path, ws)


def test_images_without_class_folders(ws, tmp_path):
    entries = {f"{i}.png": _png(seed=i) for i in range(5)}
    with pytest.raises(DatasetError, match="Found 5 images in 'd.zip' but no class folders"):
        ingest(_zip(tmp_path / "d.zip", entries), ws)


def test_single_class(ws, tmp_path):
    entries = _classes(classes=("cat",), prefix="pets/")
    with pytest.raises(
        DatasetError, match=r"only 1 class \('cat', 12 images\).*at least 2 classes"
    ):
        ingest(_zip(tmp_path / "d.zip", entries), ws)


def test_class_with_one_image(ws, tmp_path):
    entries = _classes() | {"bird/0.png": _png((1, 2, 3))}
    with pytest.raises(DatasetError, match="Class 'bird' has only 1 usable image; every class"):
        ingest(_zip(tmp_path / "d.zip", entries), ws)


def test_class_left_with_one_readable_image(ws, tmp_path):
    entries = _classes() | {"bird/0.png": _png((1, 2, 3)), "bird/1.png": b"not a png at all"}
    with pytest.raises(DatasetError, match="Class 'bird' has only 1 usable image"):
        ingest(_zip(tmp_path / "d.zip", entries), ws)


def test_only_corrupt_images(ws, tmp_path):
    entries = {"cat/1.jpg": b"garbage", "dog/1.jpg": b"\xff\xd8\xff garbage"}
    with pytest.raises(DatasetError, match="No readable images found in 'd.zip'"):
        ingest(_zip(tmp_path / "d.zip", entries), ws)


# ------------------------------------------------------------------------------------------
# warnings


def test_few_images_warning(ws, tmp_path):
    entries = _classes(n_per_class=12) | {
        f"bird/{i}.png": _png((5, 5, 5), seed=900 + i) for i in range(4)
    }
    ds = ingest(_zip(tmp_path / "d.zip", entries), ws)
    assert any("Class 'bird' has only 4 images; add at least 10" in w for w in ds.warnings)


def test_imbalance_warning(ws, tmp_path):
    entries = _classes(n_per_class=10) | {
        f"cow/{i}.png": _png((9, 9, 9), seed=700 + i) for i in range(30)
    }
    ds = ingest(_zip(tmp_path / "d.zip", entries), ws)
    imbalance = [w for w in ds.warnings if w.startswith("Classes are imbalanced")]
    assert imbalance and "'cow' has 30 images but 'cat' only 10 (3.0x)" in imbalance[0]
    assert "class weights" in imbalance[0]
    assert ds.has_warning("imbalance") and not ds.has_warning("duplicates")
    item = next(i for i in ds.warning_items if i["code"] == "imbalance")
    assert item["message"] == imbalance[0]
    assert ds.summary()["warning_codes"] == ds.warning_codes
    assert len(ds.warning_codes) == len(ds.warnings)


def test_duplicate_warnings_within_and_across_classes(ws, tmp_path):
    entries = _classes()
    entries["cat/copy.png"] = entries["cat/0.png"]
    entries["dog/cat-in-dogs.png"] = entries["cat/1.png"]
    ds = ingest(_zip(tmp_path / "d.zip", entries), ws)
    text = " | ".join(ds.warnings)
    assert "1 image is an exact copy of another image in the same class" in text
    assert "'cat/0.png' = 'cat/copy.png'" in text
    assert "1 image appears in more than one class" in text


def test_duplicates_across_splits_warn_about_leakage(ws, tmp_path):
    entries = _classes(prefix="train/") | _classes(prefix="test/")  # identical pixels: leakage
    ds = ingest(_zip(tmp_path / "d.zip", entries), ws)
    leak = [w for w in ds.warnings if "more than one split" in w]
    assert leak and leak[0].startswith("24 images") and "leakage" in leak[0]


def test_tiny_images_warning(ws, tmp_path):
    entries = _classes(size=(20, 18))
    ds = ingest(_zip(tmp_path / "d.zip", entries), ws)
    assert any("24 images are smaller than 32 px" in w and "20x18" in w for w in ds.warnings)


def test_junk_is_skipped_with_reasons(ws, tmp_path):
    good = _classes()
    jpeg = _png(fmt="JPEG", size=(64, 64), seed=5)
    entries = good | {
        "__MACOSX/cat/._0.png": b"\x00\x05\x16\x07",
        "__MACOSX/dog/._1.png": b"\x00\x05\x16\x07",
        "cat/.DS_Store": b"junk",
        "cat/._2.png": b"resource fork",
        "Thumbs.db": b"junk",
        "dog/desktop.ini": b"[x]",
        "dog/notes.txt": b"hello",
        "dog/inner.zip": _zip(tmp_path / "inner.zip", {"x/1.png": _png()}).read_bytes(),
        "cat/corrupt.jpg": b"\xff\xd8\xff\xe0 this is not really a jpeg",
        "cat/truncated.jpg": jpeg[: len(jpeg) // 2],
        "cat/empty.png": b"",
        "dog/fake.png": b"GIF89a but not quite",
        "stray.png": _png(seed=77),
    }
    ds = ingest(_zip(tmp_path / "d.zip", entries), ws)
    reasons = _reasons(ds)
    assert reasons["__MACOSX/"] == "macOS metadata (2 files)"
    assert reasons["cat/.DS_Store"] == "hidden file"
    assert reasons["cat/._2.png"] == "hidden file"
    assert reasons["Thumbs.db"] == "Windows system file"
    assert reasons["dog/desktop.ini"] == "Windows system file"
    assert reasons["dog/notes.txt"] == "not an image (.txt)"
    assert reasons["dog/inner.zip"].startswith("archive inside the dataset (not expanded")
    assert reasons["cat/corrupt.jpg"] == "corrupt or truncated image"
    assert reasons["cat/truncated.jpg"] == "corrupt or truncated image"
    assert reasons["cat/empty.png"] == "empty file"
    assert reasons["dog/fake.png"].startswith("not a readable image")
    assert reasons["stray.png"] == "image outside any class folder"
    assert ds.counts() == {"train": {"cat": 12, "dog": 12}}
    # Nothing from the nested archive was expanded, nothing junk was written.
    files = {p.relative_to(ds.root).as_posix() for p in ds.root.rglob("*") if p.is_file()}
    assert not any("x/1.png" in f or "__MACOSX" in f or "notes" in f for f in files)
    skipped_warning = [w for w in ds.warnings if "files were skipped" in w]
    # Routine system files are listed but not warned about; the 7 real problems are.
    assert skipped_warning and skipped_warning[0].startswith("7 files were skipped")
    assert "(corrupt or truncated image: 2; " in skipped_warning[0]


def test_every_warning_has_its_code_and_old_manifests_get_theirs(ws, tmp_path):
    entries = _classes(prefix="train/", size=(20, 18)) | _classes(prefix="test/", size=(20, 18))
    entries |= {
        f"train/cow/{i}.png": _png((9, 9, 9), size=(20, 18), seed=700 + i) for i in range(3)
    }
    entries |= {f"test/cow/{i}.png": _png((9, 9, 9), size=(20, 18), seed=800 + i) for i in range(3)}
    entries["train/cat/copy.png"] = entries["train/cat/0.png"]
    entries["train/dog/cat-in-dogs.png"] = entries["train/cat/1.png"]
    entries["train/dog/notes.txt"] = b"hello"
    ds = ingest(_zip(tmp_path / "d.zip", entries), ws)
    expected = [
        "few_images",
        "imbalance",
        "duplicates",
        "duplicates_across_classes",
        "duplicates_across_splits",
        "tiny_images",
        "skipped_files",
    ]
    assert ds.warning_codes == expected
    assert set(expected) == set(data.WARNING_CODES)
    assert [i["message"] for i in ds.warning_items] == ds.warnings
    assert all(ds.has_warning(code) for code in expected) and not ds.has_warning("nope")
    manifest = json.loads(ds.manifest_path.read_text())
    assert manifest["warning_codes"] == expected
    # A manifest written before warnings had codes still loads; its codes come from the text.
    del manifest["warning_codes"]
    ds.manifest_path.write_text(json.dumps(manifest))
    old = data.load_dataset(ds.manifest_path)
    assert old.warnings == ds.warnings and old.warning_codes == expected
    manifest["warnings"].append("Something a later version said.")
    ds.manifest_path.write_text(json.dumps(manifest))
    assert data.load_dataset(ds.manifest_path).warning_codes == [*expected, ""]


def test_routine_junk_alone_gives_no_warning(ws, tmp_path):
    entries = _classes() | {"__MACOSX/cat/._0.png": b"x", "cat/.DS_Store": b"x"}
    ds = ingest(_zip(tmp_path / "d.zip", entries), ws)
    assert ds.warnings == []
    assert len(ds.skipped) == 2


# ------------------------------------------------------------------------------------------
# hostile zips


def test_zip_slip_and_absolute_paths_are_never_written(ws, tmp_path):
    entries = _classes() | {
        "../evil.png": _png(seed=1),
        "cat/../../evil2.png": _png(seed=2),
        "/abs.png": _png(seed=3),
        "C:/windows.png": _png(seed=4),
        "..\\backslash.png": _png(seed=5),
    }
    ds = ingest(_zip(tmp_path / "d.zip", entries), ws)
    reasons = _reasons(ds)
    for name in (
        "../evil.png",
        "cat/../../evil2.png",
        "/abs.png",
        "C:/windows.png",
        "../backslash.png",
    ):
        assert reasons[name] == "unsafe path (outside the dataset)"
    written = {p.name for p in tmp_path.rglob("*.png")}
    assert not written & {"evil.png", "evil2.png", "abs.png", "windows.png", "backslash.png"}
    assert not Path("/abs.png").exists()


def _raw_entry(zf: zipfile.ZipFile, name: str, mode: int, payload: bytes) -> None:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # unix, so the mode bits count
    info.external_attr = mode << 16
    zf.writestr(info, payload)


def test_symlink_and_device_entries_are_skipped(ws, tmp_path):
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, payload in _classes().items():
            zf.writestr(name, payload)
        _raw_entry(zf, "cat/link.png", stat.S_IFLNK | 0o777, b"/etc/passwd")
        _raw_entry(zf, "cat/dev.png", stat.S_IFCHR | 0o666, b"")
        _raw_entry(zf, "cat/fifo.png", stat.S_IFIFO | 0o666, b"")
    ds = ingest(path, ws)
    reasons = _reasons(ds)
    assert reasons["cat/link.png"] == "symbolic link (not extracted)"
    assert reasons["cat/dev.png"] == "special file (device, pipe or socket)"
    assert reasons["cat/fifo.png"] == "special file (device, pipe or socket)"
    assert not any(p.is_symlink() for p in ws.rglob("*"))
    assert ds.counts()["train"]["cat"] == 12


def test_zip_bomb_of_streamed_zeros_is_refused_before_extracting(ws, tmp_path):
    path = tmp_path / "bomb.zip"
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf,
        zf.open("cat/bomb.png", "w", force_zip64=True) as out,
    ):
        zeros = bytes(1 << 20)
        for _ in range(40):  # 40 MB of zeros deflate to about 40 KB
            out.write(zeros)
    assert path.stat().st_size < 200_000
    with pytest.raises(
        DatasetError, match=r"'bomb.zip' looks like a zip bomb: 'cat/bomb.png' expands"
    ):
        ingest(path, ws)
    assert not any(p.is_file() for p in (ws / "datasets").rglob("*"))


def test_total_size_limit(ws, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRAIN_MAX_EXTRACT_MB", "0.01")
    path = _zip(tmp_path / "d.zip", _classes())
    with pytest.raises(
        DatasetError, match=r"would expand to .* more than the limit .*RETRAIN_MAX_EXTRACT_MB"
    ):
        ingest(path, ws)


def test_entry_count_limit(ws, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRAIN_MAX_ZIP_ENTRIES", "5")
    path = _zip(tmp_path / "d.zip", _classes())
    with pytest.raises(DatasetError, match=r"has 24 entries, more than the limit of 5"):
        ingest(path, ws)


def test_per_file_size_limit_skips_the_file(ws, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRAIN_MAX_FILE_MB", "0.05")
    noise = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    entries = _classes() | {"cat/huge.png": buf.getvalue()}
    ds = ingest(_zip(tmp_path / "d.zip", entries), ws)
    assert _reasons(ds)["cat/huge.png"].startswith("too large (117.")
    assert not (ds.root / "cat/huge.png").exists()


def test_folder_skips_symlinks_hidden_folders_and_huge_files(
    ws, tmp_path, make_image_folder, monkeypatch
):
    folder = make_image_folder(per_class=12)
    (folder / ".git").mkdir()
    (folder / ".git" / "x.png").write_bytes(_png())
    outside = tmp_path / "secret.png"
    outside.write_bytes(_png(seed=3))
    (folder / "cat" / "link.png").symlink_to(outside)
    (folder / "dog_link").symlink_to(folder / "dog")
    noise = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "dog" / "huge.png")
    monkeypatch.setenv("RETRAIN_MAX_FILE_MB", "0.05")
    ds = ingest(folder, ws)
    reasons = _reasons(ds)
    assert reasons[".git/"] == "hidden folder"
    assert reasons["cat/link.png"] == "symbolic link (not followed)"
    assert reasons["dog_link/"] == "symbolic link (not followed)"
    assert reasons["dog/huge.png"].startswith("too large (117.")
    assert ds.class_names == ["cat", "dog"]
    assert ds.counts() == {"train": {"cat": 12, "dog": 12}}


def test_bad_limit_setting(ws, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRAIN_MAX_ZIP_RATIO", "lots")
    with pytest.raises(ConfigError, match="RETRAIN_MAX_ZIP_RATIO='lots' is not a number"):
        ingest(_zip(tmp_path / "d.zip", _classes()), ws)
    monkeypatch.setenv("RETRAIN_MAX_ZIP_RATIO", "0")
    with pytest.raises(ConfigError, match="RETRAIN_MAX_ZIP_RATIO='0' must be positive"):
        ingest(_zip(tmp_path / "d.zip", _classes()), ws)


@pytest.mark.parametrize("side", [9000, 30000])  # 81 MP: Pillow's warning range; 900 MP: error
def test_decompression_bomb_png_is_skipped(ws, tmp_path, side):
    entries = _classes() | {"cat/bomb.png": _bomb_png(side, side)}
    ds = ingest(_zip(tmp_path / "d.zip", entries), ws)
    assert "possible decompression bomb" in _reasons(ds)["cat/bomb.png"]
    assert ds.counts()["train"]["cat"] == 12


# ------------------------------------------------------------------------------------------
# image modes, EXIF, resizing


def _mode_images(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Write one 40x40 image per awkward mode; return name -> expected RGB after decoding."""
    folder.mkdir(parents=True)
    expected = {}

    def save(name, img, rgb, **kw):
        img.save(folder / name, **kw)
        expected[name] = rgb

    save("gray.png", Image.new("L", (40, 40), 100), (100, 100, 100))
    save("bilevel.png", Image.new("1", (40, 40), 1), (255, 255, 255))
    pal = Image.new("P", (40, 40), 3)
    pal.putpalette([0, 0, 0] * 3 + [10, 200, 30] + [0, 0, 0] * 252)
    save("palette.png", pal, (10, 200, 30))
    pal_t = pal.copy()
    save("palette_transparent.png", pal_t, (255, 255, 255), transparency=3)
    save("rgba_clear.png", Image.new("RGBA", (40, 40), (0, 0, 255, 0)), (255, 255, 255))
    save("rgba_opaque.png", Image.new("RGBA", (40, 40), (0, 0, 255, 255)), (0, 0, 255))
    save("la_half.png", Image.new("LA", (40, 40), (0, 128)), (127, 127, 127))
    save("cmyk.jpg", Image.new("CMYK", (40, 40), (0, 0, 0, 0)), (255, 255, 255), quality=100)
    save("cmyk.tif", Image.new("CMYK", (40, 40), (255, 0, 0, 0)), (0, 255, 255))
    gray16 = Image.fromarray(np.full((40, 40), 65535 // 2, dtype=np.uint16))
    save("gray16.png", gray16, (128, 128, 128))
    save("float.tif", Image.fromarray(np.full((40, 40), 0.5, dtype=np.float32)), (128, 128, 128))
    save("rgb.webp", Image.new("RGB", (40, 40), (250, 10, 10)), (250, 10, 10), lossless=True)
    save("rgb.bmp", Image.new("RGB", (40, 40), (1, 2, 3)), (1, 2, 3))
    save("rgb.gif", Image.new("RGB", (40, 40), (255, 255, 0)), (255, 255, 0))
    save("ycbcr.jpg", Image.new("RGB", (40, 40), (0, 128, 255)), (0, 128, 255), quality=100)
    return expected


def test_every_mode_becomes_rgb(ws, tmp_path, make_image_folder):
    root = make_image_folder(per_class=12)
    expected = _mode_images(root / "modes")
    ds = ingest(root, ws)
    assert ds.counts()["train"]["modes"] == len(expected)
    cache = load_images(ds, "train", (16, 16))
    for row, rel in enumerate(cache.paths):
        name = rel.split("/", 1)[1]
        if rel.startswith("modes/"):
            pixel = cache.images[row, 8, 8].astype(int)
            assert np.abs(pixel - np.array(expected[name])).max() <= 3, (name, pixel)


def _exif_image(path: Path, orientation: int) -> None:
    """A 40 wide x 20 tall image: left half red, right half blue, with an EXIF orientation."""
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, exif=exif, quality=95)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    _exif_image(path, orientation=6)  # "rotate 90 clockwise to display"
    out = load_image_file(path, (40, 20))  # H=40, W=20: the displayed shape
    assert out.shape == (40, 20, 3)
    top, bottom = out[5, 10], out[35, 10]
    assert top[0] > 200 and top[2] < 60  # red on top after the clockwise turn
    assert bottom[2] > 200 and bottom[0] < 60


def test_resize_modes(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (40, 20), (200, 0, 0)).save(path)
    pad = load_image_file(path, (20, 20), "pad")
    assert pad.shape == (20, 20, 3)
    assert pad[0, 10].tolist() == [0, 0, 0] and pad[10, 10].tolist() == [200, 0, 0]
    crop = load_image_file(path, (20, 20), "center-crop")
    assert (crop == [200, 0, 0]).all()
    squash = load_image_file(path, (10, 30))
    assert squash.shape == (10, 30, 3) and (squash == [200, 0, 0]).all()
    with pytest.raises(ConfigError, match="Unknown resize mode 'zoom'"):
        load_image_file(path, (20, 20), "zoom")
    with pytest.raises(ConfigError, match="out of range"):
        load_image_file(path, (0, 20))


def test_load_image_file_rejects_non_images(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"nope")
    with pytest.raises(DatasetError, match="'x.png' cannot be used: not a readable image"):
        load_image_file(path, (8, 8))


# ------------------------------------------------------------------------------------------
# cache


def test_cache_is_a_read_only_memmap_matching_the_files(ws, make_image_folder):
    ds = ingest(make_image_folder(per_class=12, splits=("train", "test")), ws)
    cache = load_images(ds, "test", (24, 20), "pad")
    assert isinstance(cache, ImageCache)
    assert isinstance(cache.images, np.memmap) and not cache.images.flags.writeable
    assert cache.images.shape == (24, 24, 20, 3) and cache.images.dtype == np.uint8
    assert cache.labels.dtype == np.int64
    assert cache.paths == [rel for rel, _ in ds.splits["test"]]
    assert cache.labels.tolist() == [label for _, label in ds.splits["test"]]
    file = ds.manifest_path.parent / "cache" / "test_24x20_pad.npy"
    assert Path(cache.images.filename) == file
    for row in (0, 7, 23):
        expected = load_image_file(ds.root / cache.paths[row], (24, 20), "pad")
        assert np.array_equal(cache.images[row], expected)
    # A second call reads the same file without rebuilding it.
    before = file.stat().st_mtime_ns
    again = load_images(ds, "test", (24, 20), "pad")
    assert file.stat().st_mtime_ns == before
    assert np.array_equal(np.asarray(again.images), np.asarray(cache.images))
    with pytest.raises(DatasetError, match="has no 'val' split"):
        load_images(ds, "val", (24, 20))


def test_parallel_cache_equals_serial(ws, make_image_folder, monkeypatch):
    ds = ingest(make_image_folder(per_class=40, size=48), ws)
    serial = np.array(load_images(ds, "train", (16, 16), "center-crop").images)
    monkeypatch.setattr(decoding, "_PARALLEL_MIN", 1)
    monkeypatch.setenv("RETRAIN_DECODE_WORKERS", "2")
    parallel = load_images(ds, "train", (16, 16), "squash")
    again = load_images(ds, "train", (16, 16), "center-crop")  # cached: not rebuilt
    assert np.array_equal(np.asarray(again.images), serial)
    monkeypatch.setattr(decoding, "_PARALLEL_MIN", 10_000)
    for row in (0, 41, 79):
        expected = load_image_file(ds.root / parallel.paths[row], (16, 16))
        assert np.array_equal(parallel.images[row], expected)


def test_rebuilds_a_damaged_cache_and_reports_vanished_images(ws, make_image_folder):
    folder = make_image_folder(per_class=12)
    ds = ingest(folder, ws)
    cache = load_images(ds, "train", (8, 8))
    path = Path(cache.images.filename)
    del cache
    np.save(path, np.zeros((3, 8, 8, 3), dtype=np.uint8))  # wrong shape: rebuilt
    assert load_images(ds, "train", (8, 8)).images.shape == (24, 8, 8, 3)
    (folder / "cat" / "3.png").write_bytes(b"broken now")
    with pytest.raises(
        DatasetError, match="'cat/3.png' of dataset 'images' cannot be read any more"
    ):
        load_images(ds, "train", (9, 9))
    assert not list((ds.manifest_path.parent / "cache").glob(".*"))  # no temp files left


# ------------------------------------------------------------------------------------------
# idempotency, manifests, uploads


def test_same_zip_twice_reuses_extraction(ws, make_image_folder, make_zip):
    path = make_zip(make_image_folder(per_class=12))
    first = ingest(path, ws)
    marker = first.root / "cat" / "0.png"
    stamp = marker.stat().st_mtime_ns
    load_images(first, "train", (8, 8))
    second = ingest(path, ws)
    assert second.dataset_id == first.dataset_id
    assert second.manifest_path == first.manifest_path
    assert marker.stat().st_mtime_ns == stamp  # not extracted again
    assert sorted(p.name for p in (ws / "datasets").iterdir()) == sorted(["zips", first.dataset_id])


def test_same_images_in_a_folder_and_a_renamed_zip_share_the_id(ws, make_image_folder, make_zip):
    folder = make_image_folder(per_class=12)
    from_zip = ingest(make_zip(folder, name="one.zip"), ws)
    load_images(from_zip, "train", (8, 8))
    other = ingest(make_zip(folder, name="two.zip"), ws)
    assert other.dataset_id == from_zip.dataset_id
    assert other.name == "two"
    assert (other.manifest_path.parent / "cache" / "train_8x8_squash.npy").exists()
    assert ingest(folder, ws).dataset_id == from_zip.dataset_id


def test_changed_content_changes_the_id(ws, tmp_path):
    entries = _classes()
    first = ingest(_zip(tmp_path / "a.zip", entries), ws)
    entries["cat/0.png"] = _png(seed=12345)
    second = ingest(_zip(tmp_path / "b.zip", entries), ws)
    assert first.dataset_id != second.dataset_id


def test_ingest_accepts_a_manifest_and_load_dataset_roundtrips(ws, make_image_folder, make_zip):
    ds = ingest(make_zip(make_image_folder(per_class=12)), ws)
    assert ingest(ds.manifest_path, ws) == ds
    assert load_dataset(str(ds.manifest_path)) == ds


def test_load_dataset_errors(ws, tmp_path, make_image_folder):
    with pytest.raises(DatasetError, match="No dataset manifest at"):
        load_dataset(tmp_path / "missing" / "manifest.json")
    bad = tmp_path / "manifest.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="is unreadable"):
        load_dataset(bad)
    folder = make_image_folder(per_class=12)
    ds = ingest(folder, ws)
    folder.rename(folder.with_name("moved"))
    with pytest.raises(DatasetError, match="The images of dataset 'images' are gone"):
        load_dataset(ds.manifest_path)


def test_ingest_upload_names_the_dataset_and_cleans_up(ws, make_image_folder, make_zip):
    payload = make_zip(make_image_folder(per_class=12)).read_bytes()
    ds = ingest_upload(io.BytesIO(payload), "../../My Flowers.zip", ws)
    assert ds.name == "My Flowers"
    assert list((ws / "uploads").iterdir()) == []


def test_two_processes_writing_the_sample_at_once_leave_one_whole_copy(tmp_path: Path):
    """Two visitors clicking "Use sample dataset" on a fresh host (or a model worker warming
    while one does): each writes its own folder and renames it into place."""
    import threading

    from retrain.data.sample import sample_dataset

    found: list[Path] = []
    threads = [
        threading.Thread(target=lambda: found.append(sample_dataset(tmp_path))) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert found[0] == found[1]
    counts = {d.name: len(list(d.glob("*.png"))) for d in found[0].iterdir()}
    assert sorted(counts) == [f"digit {d}" for d in range(5, 10)]
    marker = found[0].with_name(found[0].name + ".complete")
    assert counts == json.loads(marker.read_text()) and sum(counts.values()) == 896
    assert [p.name for p in found[0].parent.iterdir() if p.name.startswith(".")] == []


def test_sample_dataset_ingests_cleanly(ws):
    from retrain.data.sample import sample_dataset

    ds = ingest(sample_dataset(ws), ws)
    assert ds.class_names == [f"digit {d}" for d in range(5, 10)]
    assert ds.warnings == [] and ds.skipped == []
    assert min(ds.counts()["train"].values()) >= 170


# ------------------------------------------------------------------------------------------
# stratified_split, thumbnails


def test_stratified_split_keeps_every_class_on_both_sides():
    labels = np.array([0] * 50 + [1] * 2 + [2] * 3 + [3] * 1)
    train, val = stratified_split(labels, 0.2, seed=7)
    assert train.dtype == np.int64 and val.dtype == np.int64
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(labels)))
    assert not set(train) & set(val)
    for cls in (0, 1, 2):
        assert (labels[val] == cls).sum() >= 1 and (labels[train] == cls).sum() >= 1
    assert (labels[val] == 0).sum() == 10
    assert (labels[train] == 3).sum() == 1 and (labels[val] == 3).sum() == 0
    again = stratified_split(labels, 0.2, seed=7)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    other = stratified_split(labels, 0.2, seed=8)
    assert not np.array_equal(other[1], val)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        stratified_split(labels, 1.0, seed=0)


def test_thumbnails(ws, make_image_folder):
    ds = ingest(make_image_folder(per_class=12, size=64), ws)
    thumbs = thumbnails(ds, per_class=3, size=24)
    assert list(thumbs) == ["cat", "dog"]
    assert all(len(v) == 3 and v[0].shape == (24, 24, 3) for v in thumbs.values())


# ------------------------------------------------------------------------------------------
# the CLI


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RETRAIN_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "retrain", "ingest", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_ingest_prints_json(tmp_path, make_image_folder, make_zip, _isolated_home):
    path = make_zip(make_image_folder(per_class=12, splits=("train", "test")))
    out = _cli(str(path), home=_isolated_home)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["classes"] == ["cat", "dog"]
    assert summary["splits"] == {"train": {"cat": 12, "dog": 12}, "test": {"cat": 12, "dog": 12}}
    assert summary["num_images"] == 48
    assert Path(summary["manifest"]).is_relative_to(_isolated_home)


def test_cli_ingest_bad_input_exits_2_with_one_line(tmp_path, _isolated_home):
    path = tmp_path / "photos.zip"
    path.write_bytes(b"definitely not a zip")
    out = _cli(str(path), "--workspace", str(tmp_path / "w"), home=_isolated_home)
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert lines[0].startswith("error: 'photos.zip' is not a zip file")


@needs_flowers
def test_cli_ingest_flowers12(_isolated_home):
    out = _cli(str(FLOWERS), home=_isolated_home)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert len(summary["classes"]) == 12
    assert sum(summary["splits"]["train"].values()) == 720
    assert sum(summary["splits"]["test"].values()) == 240
    assert summary["num_images"] == 960
