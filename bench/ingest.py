"""Benchmark: ingest a zip of 256x256 JPEGs and build its 224x224 cache; speed and memory.

    python bench/ingest.py                 # 5,000 then 10,000 images
    python bench/ingest.py --sizes 2000    # quicker

Each size runs in a fresh process (so peak RSS is that run's own), which records its RSS
after imports, then ingests the zip (extract, decode-check, hash, manifest) and builds the
uint8 cache at 224x224. Peak RSS growth = peak resident memory minus that baseline. Targets
(DESIGN/issue 2): >= 500 images/s on 2 cores, peak RSS growth < 300 MB and flat when the
dataset doubles.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
CLASSES = 10
SIZE = 256


def make_zip(path: Path, n: int, seed: int = 0) -> None:
    """Write ``n`` photo-like 256x256 JPEGs in ``CLASSES`` class folders into a zip."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for i in range(n):
            # Smooth colour blobs plus grain: decodes and compresses like a photo.
            small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((SIZE, SIZE), Image.BICUBIC)
            arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 12, (SIZE, SIZE, 3))
            buf = io.BytesIO()
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=88)
            zf.writestr(f"bench/class_{i % CLASSES:02d}/img_{i:06d}.jpg", buf.getvalue())


def child(zip_path: str, workspace: str) -> dict:
    """Run ingest + cache in this process and measure it (called via ``--child``)."""
    import psutil

    from retrain.data import ingest, load_images

    proc = psutil.Process()
    baseline = proc.memory_info().rss
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu0 = os.times()
    t0 = time.perf_counter()
    dataset = ingest(zip_path, Path(workspace))
    t1 = time.perf_counter()
    cache = load_images(dataset, "train", (224, 224))
    t2 = time.perf_counter()
    cpu1 = os.times()
    stop.set()
    sampler.join()
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {
        "images": dataset.num_images(),
        "cache_shape": list(cache.images.shape),
        "ingest_s": t1 - t0,
        "cache_s": t2 - t1,
        "cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
        "baseline_mb": baseline / 2**20,
        "peak_growth_mb": (max(peak[0], max_rss) - baseline) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 10000])
    parser.add_argument("--child", nargs=2, metavar=("ZIP", "WORKSPACE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    from retrain.data.dataset import _num_workers

    rows = []
    with tempfile.TemporaryDirectory(prefix="retrain-bench-") as tmp:
        for n in args.sizes:
            zip_path = Path(tmp) / f"bench_{n}.zip"
            t = time.perf_counter()
            make_zip(zip_path, n)
            print(
                f"built {n:,} JPEGs ({zip_path.stat().st_size / 2**20:.0f} MB zip) "
                f"in {time.perf_counter() - t:.0f} s",
                file=sys.stderr,
            )
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(zip_path), str(Path(tmp) / f"ws{n}")],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(out.stdout))
            zip_path.unlink()

    print(f"\ningest + cache at 224x224, {_num_workers()} decode threads, {os.cpu_count()} CPUs")
    header = f"{'images':>8} {'ingest s':>9} {'cache s':>8} {'total s':>8} {'images/s':>9} {'CPU ms/img':>10} {'peak RSS growth':>16}"
    print(header)
    print("-" * len(header))
    for r in rows:
        total = r["ingest_s"] + r["cache_s"]
        print(
            f"{r['images']:>8,} {r['ingest_s']:>9.1f} {r['cache_s']:>8.1f} {total:>8.1f} "
            f"{r['images'] / total:>9.0f} {1000 * r['cpu_s'] / r['images']:>10.2f} "
            f"{r['peak_growth_mb']:>13.0f} MB"
        )
    print("targets: >= 500 images/s on 2 cores; peak RSS growth < 300 MB, flat as N doubles")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} (other work slows images/s)")


if __name__ == "__main__":
    main()
