"""Reading a COCO dataset against reading the same images in the Magnetic Tile layout.

    python -m dli.bench.annotations --images 5000            # real MT if found, else synthetic
    python -m dli.bench.annotations --data /path/to/MT --images 5000 --repeats 3

Builds, in a scratch folder, two datasets over the same `--images` image files (Magnetic Tile's
own, linked several times over when there are fewer): one in the MT layout (``MT_<Class>/Imgs/``,
image + binary mask), one as COCO JSON whose polygons are the outlines of the MT masks'
instances (`dli.data.synth_formats.instance_outlines`). Then times what ``dli train`` does
before its first step, `read_dataset` + `validate`:

- ``mt``: the MT layout (today's formats);
- ``coco, first run``: the COCO file parsed and checked, every annotation rasterized by
  pycocotools into index PNGs in an empty mask cache, then validated like any index-mask set;
- ``coco, cached``: the same with the cache filled (a second run: nothing rasterized).

Each is run `--repeats` times (the files' pages warm after the first build); the median, min
and max are printed with the ratio to ``mt``. The numbers, command and machine of a run are
recorded in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from dli.bench import magnetic_tile_root


def _mt_files(root: Path) -> list[tuple[Path, Path | None, str]]:
    """(image, mask or None, class name) of every image of an MT-layout dataset."""
    from dli.data.manifest import read_dataset

    manifest = read_dataset(root)
    return [(s.image, s.mask, manifest.class_name(s.class_id)) for s in manifest.samples]


def build(source: Path, images: int, work: Path) -> tuple[Path, Path]:
    """The MT-layout folder and the COCO file over `images` links to `source`'s files."""
    from dli.data.synth_formats import coco_segmentation, instance_outlines

    files = _mt_files(source)
    mt, coco = work / "mt", work / "coco"
    coco_doc: dict[str, list] = {"images": [], "annotations": [], "categories": []}
    names: list[str] = []
    outlines: dict[Path, list] = {}
    for number in range(images):
        image, mask, name = files[number % len(files)]
        folder = mt / f"MT_{name.capitalize()}" / "Imgs"
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{image.stem}_{number:05d}"
        os.symlink(image, folder / f"{stem}{image.suffix}")
        if mask is not None:
            os.symlink(mask, folder / f"{stem}.png")
        (coco / "images").mkdir(parents=True, exist_ok=True)
        os.symlink(image, coco / "images" / f"{stem}{image.suffix}")
        with Image.open(image) as opened:
            width, height = opened.size
        image_id = number + 1
        coco_doc["images"].append(
            {"id": image_id, "file_name": f"images/{stem}{image.suffix}", "width": width, "height": height}
        )
        if name == "free" or mask is None:
            continue
        if name not in names:
            names.append(name)
        if mask not in outlines:
            with Image.open(mask) as opened:
                labels = (np.asarray(opened.convert("L")) > 0).astype(np.uint8)
            outlines[mask] = [
                (coco_segmentation(pixels, ring), int(pixels.sum()))
                for _, pixels, ring in instance_outlines(labels)
            ]
        for segmentation, area in outlines[mask]:
            coco_doc["annotations"].append(
                {
                    "id": len(coco_doc["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": names.index(name) + 1,
                    "segmentation": segmentation,
                    "area": area,
                    "iscrowd": 0,
                }
            )
    coco_doc["categories"] = [{"id": k + 1, "name": n} for k, n in enumerate(names)]
    path = coco / "annotations.json"
    path.write_text(json.dumps(coco_doc))
    return mt, path


def _read_and_validate(data: Path) -> int:
    from dli.data.manifest import read_dataset
    from dli.data.validation import validate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest = read_dataset(data)
        validate(manifest)
    return len(manifest)


def measure(mt: Path, coco: Path, cache: Path, repeats: int) -> dict[str, list[float]]:
    """Seconds of `read_dataset` + `validate` per run for the MT layout, COCO uncached and cached."""
    times: dict[str, list[float]] = {"mt": [], "coco, first run": [], "coco, cached": []}
    previous = os.environ.get("DLI_CACHE")
    os.environ["DLI_CACHE"] = str(cache)
    try:
        _measure(mt, coco, cache, repeats, times)
    finally:
        if previous is None:
            os.environ.pop("DLI_CACHE", None)
        else:
            os.environ["DLI_CACHE"] = previous
    return times


def _measure(mt: Path, coco: Path, cache: Path, repeats: int, times: dict[str, list[float]]) -> None:
    for _ in range(repeats):
        start = time.perf_counter()
        _read_and_validate(mt)
        times["mt"].append(time.perf_counter() - start)
        shutil.rmtree(cache, ignore_errors=True)
        start = time.perf_counter()
        _read_and_validate(coco)
        times["coco, first run"].append(time.perf_counter() - start)
        start = time.perf_counter()
        _read_and_validate(coco)
        times["coco, cached"].append(time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dli.bench.annotations", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--data", type=Path, help="an MT-layout dataset (default: real MT, else synthetic)")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temp folder, removed)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="dli-bench-annotations-"))
    try:
        source = args.data or magnetic_tile_root()
        if source is None:
            from dli.data.synth import generate

            source = work / "source"
            generate(source, images=min(args.images, 1000), seed=0)
        start = time.perf_counter()
        mt, coco = build(source.absolute(), args.images, work)
        print(f"built {args.images} images from {source} in {time.perf_counter() - start:.1f} s")
        times = measure(mt, coco, work / "cache", args.repeats)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(times["mt"])
    print(f"{'read_dataset + validate':<24}  {'median s':>8}  {'min':>6}  {'max':>6}  {'/ mt':>5}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(
            f"{name:<24}  {median:>8.2f}  {min(samples):>6.2f}  {max(samples):>6.2f}  {median / base:>5.2f}"
        )
    cpus = os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.machine()}, {cpus} CPUs, load {load:.1f}, Python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
