"""The Model page, driven with Streamlit's AppTest: each source, the head controls, the diff."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "model.py")
BUILTIN = "builtin:digits-cnn"


def page() -> AppTest:
    return AppTest.from_file(PAGE, default_timeout=120)


def texts(at: AppTest, kind: str) -> list[str]:
    return [element.value for element in getattr(at, kind)]


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


@pytest.fixture
def dataset_manifest(tmp_path: Path, make_image_folder) -> str:
    """A real 3-class dataset ingested into a workspace; returns its manifest path."""
    from retrain.data import ingest

    folder = make_image_folder(classes=("cat", "dog", "owl"), per_class=3, size=32)
    return str(ingest(folder, tmp_path / "ws").manifest_path)


def test_builtin_model_without_a_dataset_shows_the_architecture(keras_cache: Path):
    at = page().run()
    assert not at.exception, at.exception
    assert at.radio(key="model_source").value == "Built-in starter model"
    shown = metrics(at)
    assert shown["Parameters"] == "24,005" and shown["Layers"] == "11"
    assert shown["Input (RGB)"] == "32×32" and shown["Original classes"] == "5"
    assert any("No dataset yet" in text for text in texts(at, "info"))
    assert at.session_state["base"] == BUILTIN
    stack = [el.proto.body for el in at.get("html") if "Layer stack" in el.proto.body]
    assert len(stack) == 1 and stack[0].count('data-status="frozen"') >= 5
    assert "Before → after" not in texts(at, "subheader")
    # The layer table is built only when its expander is opened; its search filters it.
    assert not at.dataframe
    at.session_state["layer_tables"] = True  # what opening the expander sets
    at.run()
    at.text_input(key="layer_search").input("conv").run()
    table = at.dataframe[0].value
    assert list(table["name"]) == ["conv1", "conv2", "conv3"]


def test_builtin_model_with_a_dataset_remembers_the_surgery(keras_cache: Path, dataset_manifest):
    at = page()
    at.session_state["dataset"] = dataset_manifest
    at.run()
    assert not at.exception, at.exception
    assert "Before → after" in texts(at, "subheader")
    assert at.session_state["surgery"] == {
        "cut_at": "features",
        "freeze": "all",
        "hidden_units": 0,
        "dropout": 0.2,
        "add_conv": 0,
        "binary_sigmoid": False,
    }
    shown = metrics(at)
    assert shown["Trainable base layers"] == "0" and shown["Frozen layers"] == "4"
    assert any("3 units" in text for text in texts(at, "markdown"))

    # The head options are lazy expanders: built only once opened.
    assert not [w for w in at.number_input if w.key in ("hidden_units", "add_conv")]
    assert not [w for w in at.slider if w.key == "dropout"]
    at.session_state["head_options"] = True
    at.session_state["conv_block"] = True
    # The cut is said in words; its list of layers is a lazy expander too.
    assert not [w for w in at.selectbox if w.key == f"cut_at::{BUILTIN}"]
    assert any(t.startswith("Cut after **features**: removes") for t in texts(at, "caption"))
    at.session_state["cut_options"] = True
    at.radio(key="freeze_mode").set_value("top").run()
    assert at.slider(key="dropout").value == 0.2 and at.number_input(key="add_conv").value == 0
    # The cut still shows the chosen layer on a later run (it showed "Choose an option").
    cut = at.selectbox(key=f"cut_at::{BUILTIN}")
    assert cut.value is not None and cut.format_func(cut.value).endswith(
        "features (GlobalAveragePooling2D)"
    )
    at.slider(key="freeze_k").set_value(3).run()
    at.session_state["layer_tables"] = True
    at.number_input(key="hidden_units").set_value(32).run()
    assert not at.exception, at.exception
    # The opened expanders stay open although the head (and its layer count) changed.
    assert at.number_input(key="hidden_units").value == 32
    assert at.text_input(key="layer_search") and len(at.dataframe[0].value) == 15
    assert at.session_state["surgery"]["freeze"] == "top:3"
    assert at.session_state["surgery"]["hidden_units"] == 32
    for _ in range(2):  # closed again, and after Streamlit dropped the widget: still 32
        at.session_state["head_options"] = False
        at.run()
        assert at.session_state["surgery"]["hidden_units"] == 32
    assert metrics(at)["Trainable base layers"] == "1"  # conv3 (relu2/pool2 have no weights)
    saved = json.loads((Path(at.session_state["workspace"]) / "session.json").read_text())
    assert saved["surgery"]["freeze"] == "top:3" and saved["base"] == BUILTIN

    # An added conv block after a flat cut is refused in one line.
    at.number_input(key="add_conv").set_value(16).run()
    assert any("needs a 4-D cut output" in text for text in texts(at, "error"))


def test_coming_back_or_reloading_keeps_the_remembered_choices(keras_cache: Path, dataset_manifest):
    """Streamlit drops a page's widget values when another page is shown and on a reload:
    the page starts from the remembered choice, and does not write its defaults over it."""
    remembered = {
        "cut_at": None,
        "freeze": "top:2",
        "hidden_units": 0,
        "dropout": 0.3,
        "add_conv": 0,
        "binary_sigmoid": False,
        "keep_old_classes": True,
        "old_data": None,
        "original_classes": None,
    }
    at = page()  # a fresh page: no widget values, only the remembered keys
    at.session_state["dataset"] = dataset_manifest
    at.session_state["base"] = BUILTIN
    at.session_state["surgery"] = dict(remembered)
    at.run()
    assert not at.exception, at.exception
    assert at.radio(key="head_mode").value == "keep"
    assert at.radio(key="freeze_mode").value == "top" and at.slider(key="freeze_k").value == 2
    assert at.session_state["surgery"] == remembered  # the closed head options kept theirs
    at.session_state["head_options"] = True
    at.run()
    assert at.slider(key="dropout").value == 0.3
    assert at.session_state["surgery"] == remembered


def test_zoo_without_weights_needs_no_download(monkeypatch: pytest.MonkeyPatch):
    from keras.src.utils import file_utils

    def no_download(*args, **kwargs):
        raise AssertionError("the page tried to download weights")

    monkeypatch.setattr(file_utils, "urlretrieve", no_download)
    at = page().run()
    at.radio(key="model_source").set_value("Keras applications (ImageNet)").run()
    # ImageNet is the default, but nothing loads until asked for.
    assert any("Load model" in text for text in texts(at, "info"))
    at.selectbox(key="zoo_name").set_value("MobileNetV3Small").run()
    at.radio(key="zoo_weights").set_value("None (random weights)").run()
    assert not at.exception, at.exception
    assert not at.error, texts(at, "error")
    shown = metrics(at)
    assert shown["Input (RGB)"] == "224×224" and shown["Original classes"] == "1000"
    assert at.session_state["base"] == "applications:MobileNetV3Small:none"
    at.session_state["cut_options"] = True
    at.run()
    cut = at.selectbox(key="cut_at::applications:MobileNetV3Small:none")
    assert cut.value is not None and "activation_18" in cut.format_func(cut.value)


def test_uploaded_keras_model_with_labels(tmp_path: Path, dataset_manifest):
    import keras

    inp = keras.Input((32, 32, 3), name="pixels")
    x = keras.layers.Conv2D(4, 3, activation="relu", name="my_conv")(inp)
    x = keras.layers.GlobalAveragePooling2D(name="my_pool")(x)
    out = keras.layers.Dense(2, activation="softmax", name="my_out")(x)
    path = tmp_path / "mine.keras"
    keras.Model(inp, out).save(path)

    at = page()
    at.session_state["dataset"] = dataset_manifest
    at.run()
    at.radio(key="model_source").set_value("Upload .keras/.h5").run()
    assert any("Upload a .keras or .h5 model" in text for text in texts(at, "info"))
    at.file_uploader(key="model_upload").set_value(
        [
            ("mine.keras", path.read_bytes(), "application/zip"),
            ("labels.txt", b"0 yes\n1 no\n", "text/plain"),
        ]
    ).run()
    assert not at.exception, at.exception
    spec = at.session_state["base"]
    saved = Path(spec)
    assert saved.name == "mine.keras" and saved.parent.parent.name == "models"
    assert Path(at.session_state["workspace"]) in saved.parents
    assert (saved.parent / "labels.txt").is_file()
    assert any("Original classes: yes, no" in text for text in texts(at, "caption"))
    assert at.session_state["surgery"]["cut_at"] == "my_pool"
    assert metrics(at)["Layers"] == "3"


def test_a_keras2_upload_says_how_its_conversion_was_checked(tmp_path: Path, monkeypatch):
    import pages._service as service_page
    from retrain.models import load
    from retrain.service import client
    from tests.test_models import keras2_nested_h5

    path = tmp_path / "keras_model.h5"
    keras2_nested_h5(path)
    at = page()
    at.run()
    at.radio(key="model_source").set_value("Upload .keras/.h5").run()
    upload = [("keras_model.h5", path.read_bytes(), "application/octet-stream")]
    at.file_uploader(key="model_upload").set_value(upload).run()
    assert not at.exception, at.exception
    checked = [t for t in texts(at, "caption") if t.startswith("Keras 2 file rebuilt as Keras 3")]
    assert (
        len(checked) == 1
        and "outputs match the original's (read with tf_keras) within" in (checked[0])
    )

    def as_a_worker(kind, session="", on_wait=None, **args):  # answers first, checks after
        with load.writes_after():
            return client.kinds.run(kind, args)

    monkeypatch.setattr(service_page, "ask", as_a_worker)
    load._converted_path(path).unlink()  # nothing kept for this file: converted again
    at = page()
    at.session_state["base"] = str(path)
    at.run()
    assert not at.exception, at.exception
    pending = [t for t in texts(at, "caption") if t.startswith("Keras 2 file rebuilt as Keras 3")]
    assert pending and "its outputs are being compared with the original's" in pending[0]
    assert at.get("html")  # the layer stack is drawn meanwhile


def test_keep_mode_on_a_model_without_class_names_asks_for_them_in_page_words(
    tmp_path: Path, dataset_manifest
):
    import keras

    inp = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D(name="pool")(keras.layers.Conv2D(4, 3)(inp))
    path = tmp_path / "nameless.keras"
    keras.Model(inp, keras.layers.Dense(3, activation="softmax")(x)).save(path)

    at = page()
    at.session_state["dataset"] = dataset_manifest
    at.run()
    at.radio(key="model_source").set_value("Upload .keras/.h5").run()
    at.file_uploader(key="model_upload").set_value(
        ("nameless.keras", path.read_bytes(), "application/zip")
    ).run()
    at.radio(key="head_mode").set_value("keep").run()
    assert not at.exception, at.exception
    errors = texts(at, "error")
    assert len(errors) == 1 and "carries no class names for its 3 outputs" in errors[0]
    assert "type the names of its outputs in the box above (3 names in output order)" in errors[0]
    assert "--original-classes" not in errors[0]
    # Names typed in that box: the outputs table shows them, no error.
    at.text_input(key="original_classes").set_value("a, b, c").run()
    assert not texts(at, "error"), texts(at, "error")
    assert any("(original names: typed in the box above" in m.value for m in at.markdown)


def test_upload_of_a_broken_file_says_what_is_wrong():
    at = page().run()
    at.radio(key="model_source").set_value("Upload .keras/.h5").run()
    at.file_uploader(key="model_upload").set_value(
        ("broken.h5", b"\x00" * 100, "application/octet-stream")
    ).run()
    assert not at.exception, at.exception
    errors = texts(at, "error")
    assert len(errors) == 1 and "not a readable HDF5 model" in errors[0]


def test_a_new_dataset_asks_ahead_for_exactly_the_head_this_page_then_asks_for(
    keras_cache: Path, monkeypatch
):
    """The Dataset page queues the new head (pages._service.prefetch_model_page) while the
    visitor looks at their images; this page's first request must be that same request (same
    answer, same session), or the early answer is wasted and the visitor waits anyway."""
    import pages._service as service_page
    from retrain.service import ask, client

    ask("describe", spec=BUILTIN)  # known ahead, as the warm workers make it (describe_ahead)
    queued, asked = [], []
    real_ask = service_page.ask
    monkeypatch.setattr(
        service_page, "prefetch", lambda kind, **args: queued.append((kind, args)) or True
    )
    monkeypatch.setattr(
        service_page,
        "ask",
        lambda kind, **args: asked.append((kind, dict(args))) or real_ask(kind, **args),
    )
    data = AppTest.from_file(PAGE.replace("model.py", "dataset.py"), default_timeout=120).run()
    data.button(key="use_sample").click().run()
    assert not data.exception, data.exception
    assert [kind for kind, _ in queued] == ["head_preview"]
    ahead = dict(queued[0][1])
    at = page()
    at.session_state["token"] = data.session_state["token"]
    at.session_state["dataset"] = data.session_state["dataset"]
    at.run()
    assert not at.exception, at.exception
    asked_args = next(args for kind, args in asked if kind == "head_preview")
    assert asked_args.pop("session") == ahead.pop("session") == data.session_state["token"]
    asked_args.pop("on_wait")
    assert asked_args["num_classes"] == 5 and asked_args["choice"]["freeze"] == "all"
    assert client.key_of("head_preview", asked_args) == client.key_of("head_preview", ahead)
