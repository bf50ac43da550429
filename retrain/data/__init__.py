"""Data: a zip or folder of images -> a validated `Dataset`, and the image cache training reads.

Where things happen:

- ``store``     `ingest` a zip, folder or upload into the workspace (reused by content)
- ``zips``      safe zip extraction and folders read in place
- ``checks``    the layout, the checks and warnings, the manifest (`load_dataset`)
- ``images``    decoding one image safely; what is junk, what is an image
- ``cache``     `load_images`: a split decoded once into a memory-mapped uint8 array
- ``splits``    `stratified_split`, preview `thumbnails`, the ``ingest`` command
- ``dataset``   the `Dataset` and `ImageCache` types and the size limits
- ``sample``    the built-in sample dataset (scikit-learn's digits)

The names below are re-exported for pages, tests and other packages (``from retrain.data
import ingest``); modules inside the library import from the defining module. Importing this
package imports no ML framework.
"""

from __future__ import annotations

from retrain.data.cache import load_images
from retrain.data.checks import (
    FEW_IMAGES_PER_CLASS,
    IMBALANCE_RATIO,
    MANIFEST_VERSION,
    MIN_IMAGES_PER_CLASS,
    SPLITS,
    TINY_SIDE,
    WARNING_CODES,
    load_dataset,
)
from retrain.data.dataset import IMAGE_EXTENSIONS, Dataset, ImageCache, Progress
from retrain.data.images import RESIZE_MODES, load_image_file
from retrain.data.splits import cli_ingest, stratified_split, thumbnails
from retrain.data.store import ingest, ingest_upload, resolve_dataset

__all__ = [
    "Dataset",
    "FEW_IMAGES_PER_CLASS",
    "IMAGE_EXTENSIONS",
    "IMBALANCE_RATIO",
    "ImageCache",
    "MANIFEST_VERSION",
    "MIN_IMAGES_PER_CLASS",
    "Progress",
    "RESIZE_MODES",
    "SPLITS",
    "TINY_SIDE",
    "WARNING_CODES",
    "cli_ingest",
    "ingest",
    "ingest_upload",
    "load_dataset",
    "load_image_file",
    "load_images",
    "resolve_dataset",
    "stratified_split",
    "thumbnails",
]
