"""Saving uploads: one name-cleaning rule, content-addressed folders, nothing outside the folder."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from retrain.sessions.uploads import MAX_NAME_LENGTH, clean_file_name, save_upload
from retrain.sessions.workspace import is_within


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("flowers.zip", "flowers.zip"),
        ("My Flowers.zip", "My Flowers.zip"),
        ("../../other/evil.zip", "evil.zip"),
        ("..\\..\\win\\evil.h5", "evil.h5"),
        ("/etc/passwd", "passwd"),
        (".hidden.keras", "hidden.keras"),
        ("..", "upload"),
        ("", "upload"),
        ("a:b|c?.png", "a_b_c_.png"),
        ("tab\there\n.png", "tab_here_.png"),
        ("Blume\u0301.png", "Blumé.png"),  # NFC: e + combining accent -> é
    ],
)
def test_clean_file_name(sent: str, kept: str):
    assert clean_file_name(sent) == kept


def test_long_names_keep_their_extension():
    name = clean_file_name("x" * 300 + ".keras")
    assert len(name) == MAX_NAME_LENGTH and name.endswith(".keras")
    assert clean_file_name("", default="model.h5") == "model.h5"


def test_save_upload_is_content_addressed_and_stays_in_its_folder(tmp_path: Path):
    folder = tmp_path / "ws" / "uploads"
    first = save_upload(folder, "../../escape.png", b"pixels")
    assert first.name == "escape.png" and first.read_bytes() == b"pixels"
    assert is_within(first, folder) and first.parent.parent == folder
    assert save_upload(folder, "escape.png", io.BytesIO(b"pixels")) == first  # same file once
    other = save_upload(folder, "escape.png", b"other pixels")
    assert other != first and other.parent != first.parent  # never overwritten
    assert first.read_bytes() == b"pixels"
    assert not list(folder.glob(".upload-*"))  # no temporary files left behind
    assert sorted(p.name for p in (tmp_path / "ws").rglob("*") if p.is_file()) == [
        "escape.png",
        "escape.png",
    ]


def test_a_file_object_is_read_from_its_position_in_chunks(tmp_path: Path):
    data = bytes(range(256)) * 40000  # 10 MB: more than one chunk
    stream = io.BytesIO(b"skip" + data)
    stream.seek(4)
    saved = save_upload(tmp_path, "big.zip", stream)
    assert saved.read_bytes() == data
