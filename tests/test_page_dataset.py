"""The Dataset page, driven like a user would: the sample button, uploads, reloads."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
PAGE = str(ROOT / "pages" / "dataset.py")
TIMEOUT = 60


def _page(token: str | None = None) -> AppTest:
    """The page in a new browser session; ``token``: the session a browser's cookie names."""
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT)
    if token:
        at.session_state["token"] = token  # what pages._ui reads from the session cookie
    return at.run()


def _metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def _thumbnail_count(at: AppTest) -> int:
    return sum(len(el.proto.imgs) for el in at.get("image"))


def _chart(at: AppTest) -> dict[str, dict[str, int]]:
    """The images-per-class bars as drawn: {class: {split: images}}, in the page's order."""
    charts = [el.proto.body for el in at.get("html") if "Images per class" in el.proto.body]
    assert len(charts) == 1
    drawn: dict[str, dict[str, int]] = {}
    for label, segments in re.findall(
        r'<div class="rs-row" data-label="([^"]*)"(.*?)</div>', charts[0]
    ):
        drawn[html.unescape(label)] = {
            series: int(value)
            for series, value in re.findall(r'data-series="([^"]*)" data-value="([^"]*)"', segments)
        }
    return drawn


@pytest.fixture
def pets_zip(make_image_folder, make_zip) -> bytes:
    folder = make_image_folder(classes=("cat", "dog"), per_class={"cat": 12, "dog": 6})
    (folder / "notes.txt").write_text("not an image")
    return make_zip(folder).read_bytes()


def test_first_visit_says_what_to_upload():
    at = _page()
    assert not at.exception
    assert at.title[0].value == "Dataset"
    assert "one folder per class" in at.markdown[0].value
    assert "`train/`" in at.markdown[0].value
    assert "No dataset yet" in at.info[0].value
    assert at.file_uploader(key="dataset_upload").allowed_type == [".zip"]
    assert at.button(key="use_sample").label == "Use sample dataset"
    assert "dataset" not in at.session_state


def test_sample_button_loads_the_digits():
    at = _page()
    at.button(key="use_sample").click().run()
    assert not at.exception
    assert _metrics(at) == {
        "Classes": "5",
        "Images": "896",
        "Smallest class": "174",
        "Largest class": "182",
    }
    assert at.session_state["dataset_label"] == "digits-5-6-7-8-9: 5 classes, 896 images"
    assert Path(at.session_state["dataset"]).name == "manifest.json"
    chart = _chart(at)
    assert list(chart) == [f"digit {d}" for d in range(5, 10)]
    assert {split for per in chart.values() for split in per} == {"train"}
    assert _thumbnail_count(at) == 5 * 6
    assert at.success and "No problems found" in at.success[0].value
    assert "Next: choose a model" in at.markdown[-1].value


def test_uploaded_zip_shows_summary_warnings_and_skips(pets_zip):
    at = _page()
    at.file_uploader(key="dataset_upload").upload("pets.zip", pets_zip, "application/zip")
    at.run()
    assert not at.exception
    assert not at.error
    assert _metrics(at)["Classes"] == "2" and _metrics(at)["Images"] == "18"
    assert at.session_state["dataset_label"] == "pets: 2 classes, 18 images"
    warnings = [w.value for w in at.warning]
    assert any("Class 'dog' has only 6 images; add at least 10" in w for w in warnings)
    assert any("1 file was skipped" in w for w in warnings)
    assert at.expander[0].label == "Skipped files (1)"
    assert _chart(at) == {"cat": {"train": 12}, "dog": {"train": 6}}
    # A rerun (any click) neither ingests again nor loses the dataset.
    manifest = at.session_state["dataset"]
    at.run()
    assert at.session_state["dataset"] == manifest and _metrics(at)["Images"] == "18"


def test_split_folders_show_each_split(make_image_folder, make_zip):
    folder = make_image_folder(per_class=12, splits=("train", "val", "test"))
    at = _page()
    at.file_uploader(key="dataset_upload").upload("split.zip", make_zip(folder).read_bytes())
    at.run()
    assert not at.exception
    assert _metrics(at) == {
        "Classes": "2",
        "Images": "72",
        "Train images": "24",
        "Val / Test images": "24 / 24",
    }
    assert all(list(per) == ["train", "val", "test"] for per in _chart(at).values())


def test_bad_upload_shows_one_line_error_and_keeps_it(tmp_path):
    at = _page()
    at.file_uploader(key="dataset_upload").upload("holiday.zip", b"not a zip", "application/zip")
    at.run()
    assert not at.exception
    assert len(at.error) == 1
    assert at.error[0].value.startswith("'holiday.zip' is not a zip file. Zip the folder")
    assert "\n" not in at.error[0].value
    at.run()  # still shown on the next rerun, without ingesting again
    assert at.error[0].value.startswith("'holiday.zip' is not a zip file")
    assert "dataset" not in at.session_state


def test_new_upload_replaces_the_sample_and_survives_a_reload(pets_zip):
    at = _page()
    at.button(key="use_sample").click().run()
    token = at.session_state["token"]
    at.file_uploader(key="dataset_upload").upload("pets.zip", pets_zip, "application/zip")
    at.run()
    assert at.session_state["dataset_label"].startswith("pets:")
    # A browser reload: a new session with the same cookie token finds the dataset again.
    reloaded = _page(token)
    assert not reloaded.exception
    assert reloaded.session_state["dataset_label"] == "pets: 2 classes, 18 images"
    assert _metrics(reloaded)["Images"] == "18"


def test_vanished_dataset_is_explained_and_forgotten(pets_zip):
    at = _page()
    at.file_uploader(key="dataset_upload").upload("pets.zip", pets_zip, "application/zip")
    at.run()
    token = at.session_state["token"]
    manifest = Path(at.session_state["dataset"])
    manifest.unlink()
    reloaded = _page(token)
    assert not reloaded.exception
    assert "No dataset manifest" in reloaded.error[0].value
    assert "dataset" not in reloaded.session_state


def test_in_the_app_the_next_step_is_one_click_away():
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT).run()
    assert not at.get("page_link")  # nothing to go on to without a dataset
    at.button(key="use_sample").click().run()
    assert not at.exception
    assert at.session_state["dataset_label"] == "digits-5-6-7-8-9: 5 classes, 896 images"
    links = at.get("page_link")
    assert [link.proto.label for link in links] == ["Next: choose a model"]


def test_class_names_with_markup_show_as_text(make_image_folder, make_zip):
    hostile = "<img src=x onerror=alert(1)>"
    folder = make_image_folder(classes=(hostile, "[x](http://evil.example)"), per_class=10)
    at = _page()
    at.file_uploader(key="dataset_upload").upload(
        "names.zip", make_zip(folder).read_bytes(), "application/zip"
    )
    at.run()
    assert not at.exception
    shown = [m.value for m in at.markdown if "onerror" in m.value or "evil" in m.value]
    assert shown, "the class names are not on the page"
    for text in shown:
        assert "<img" not in text.replace("\\<img", ""), text  # escaped, never a tag
        assert "](http" not in text.replace("\\](http", ""), text  # never a link
