"""The built-in sample: real handwritten digits from scikit-learn, no download needed.

scikit-learn ships 1,797 scanned 8x8 digits (``load_digits``). They are rendered as 32x32
dark-on-light images. Digits 0-4 are the "original task" the built-in starter model was
trained on; digits 5-9 are the "new target data" the offline demo retrains it for.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

SAMPLE_SIZE = 32
ORIGINAL_TASK = "0-4"
NEW_TASK = "5-9"


def parse_digits(digits: str) -> list[int]:
    """Parse ``"5-9"`` or ``"0,2,4"`` into a sorted list of digits.

    Raises:
        ValueError: not digits 0-9.
    """
    out: set[int] = set()
    for part in digits.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = (int(x) for x in part.split("-", 1))
            out.update(range(lo, hi + 1))
        elif part:
            out.add(int(part))
    if not out or not out <= set(range(10)):
        raise ValueError(f"'{digits}' is not a set of digits 0-9 (e.g. '5-9' or '0,1,2').")
    return sorted(out)


def class_name(digit: int) -> str:
    """Folder/class name of a digit in the sample (``"digit 5"``)."""
    return f"digit {digit}"


def digit_images(digits: str = NEW_TASK) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Return ``(images uint8 (N, 32, 32, 3), labels int64 (N,), class_names)`` for ``digits``.

    Labels index into ``class_names`` (one per requested digit, in order). The rendering is
    the one written to PNG by `sample_dataset`, so a model trained on these arrays sees the
    same pixels as one trained on the ingested sample.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    wanted = parse_digits(digits)
    raw = load_digits()
    keep = np.isin(raw.target, wanted)
    images = []
    for pixels in raw.images[keep]:
        ink = (255 - pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        big = Image.fromarray(ink, mode="L").resize((SAMPLE_SIZE, SAMPLE_SIZE), Image.BICUBIC)
        images.append(np.asarray(big.convert("RGB")))
    labels = np.array([wanted.index(int(t)) for t in raw.target[keep]], dtype=np.int64)
    return np.stack(images), labels, [class_name(d) for d in wanted]


def sample_dataset(workspace: Path, digits: str = NEW_TASK) -> Path:
    """Write the sample as PNG class folders under ``workspace/samples`` (once); return the folder.

    Ingest the returned folder like any upload. The warm model workers write the host's copy
    when they start (`retrain.service.worker.warm`), so no visitor's click waits for it. Two
    processes writing it at once are safe: each writes a folder of its own and renames it
    into place; the first rename wins and the pixels are the same.
    """
    wanted = parse_digits(digits)
    folder = Path(workspace) / "samples" / f"digits-{'-'.join(map(str, wanted))}"
    # The completion marker sits beside the folder so ingest never sees it as a stray file.
    done = folder.with_name(folder.name + ".complete")
    if done.exists():
        return folder
    from PIL import Image

    images, labels, names = digit_images(digits)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    counters = dict.fromkeys(names, 0)
    for image, label in zip(images, labels, strict=True):
        name = names[label]
        (staging / name).mkdir(exist_ok=True)
        Image.fromarray(image).save(staging / name / f"{counters[name]:04d}.png")
        counters[name] += 1
    if folder.exists() and not done.exists():
        shutil.rmtree(folder, ignore_errors=True)  # left half-written by an older version
    try:
        os.rename(staging, folder)
    except OSError:  # another process put its copy in place first
        shutil.rmtree(staging, ignore_errors=True)
    done.write_text(json.dumps(counters))
    return folder
