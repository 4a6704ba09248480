"""COCO JSON: masks identical to pycocotools', the overlap rule, the mask cache, every bad input named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_api
from pycocotools.coco import COCO

from dli.common.errors import DliError
from dli.data.annotations import PAIRS_FILE, index_mask, materialize
from dli.data.coco import read_coco


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("DLI_CACHE", str(cache))
    return cache


def _uncompressed(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a bool mask (runs over the column-major pixels, background first)."""
    flat = mask.T.reshape(-1).astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"counts": counts, "size": list(mask.shape)}


def _random_polygon(rng: np.random.Generator, h: int, w: int) -> list[float]:
    cx, cy = rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)
    k = int(rng.integers(3, 10))
    angles = np.sort(rng.uniform(0, 2 * np.pi, k))
    radii = rng.uniform(2, 0.3 * min(h, w), k)
    xs = np.clip(cx + radii * np.cos(angles), 0, w)
    ys = np.clip(cy + radii * np.sin(angles), 0, h)
    return np.stack([xs, ys], axis=1).reshape(-1).round(2).tolist()


def write_coco(
    folder: Path, images: list[tuple[str, int, int]], annotations: list[dict], categories: list[dict]
) -> Path:
    """Write gray images of the given (name, h, w) and a COCO file listing them; returns its path."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for number, (name, h, w) in enumerate(images, start=1):
        Image.fromarray(np.full((h, w), 90, np.uint8)).save(folder / "images" / name)
        entries.append({"id": number, "file_name": f"images/{name}", "height": h, "width": w})
    for number, ann in enumerate(annotations, start=1):
        ann.setdefault("id", number)
        ann.setdefault("iscrowd", 0)
    path = folder / "annotations.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": categories}))
    return path


CATEGORIES = [{"id": 3, "name": "Crack"}, {"id": 7, "name": "pit"}, {"id": 11, "name": "stain"}]


def _generated(folder: Path, seed: int = 0) -> tuple[Path, list[tuple[int, int]]]:
    """12 images with polygons, uncompressed and compressed RLEs of random classes (some overlapping)."""
    rng = np.random.default_rng(seed)
    images, annotations, sizes = [], [], []
    for i in range(12):
        h, w = int(rng.integers(20, 70)), int(rng.integers(20, 70))
        images.append((f"im{i:02d}.png", h, w))
        sizes.append((h, w))
        if i == 11:
            continue  # listed without annotations: defect-free
        for _ in range(int(rng.integers(1, 4))):
            category = int(rng.choice([3, 7, 11]))
            kind = int(rng.integers(3))
            if kind == 0:
                seg: object = [_random_polygon(rng, h, w) for _ in range(int(rng.integers(1, 3)))]
            else:
                pixels = np.zeros((h, w), dtype=bool)
                y0, x0 = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
                pixels[y0 : y0 + int(rng.integers(2, 12)), x0 : x0 + int(rng.integers(2, 12))] = True
                if kind == 1:
                    seg = _uncompressed(pixels)
                else:
                    rle = mask_api.encode(np.asfortranarray(pixels.astype(np.uint8)))
                    seg = {"size": rle["size"], "counts": rle["counts"].decode()}
            annotations.append({"image_id": i + 1, "category_id": category, "segmentation": seg})
    return write_coco(folder, images, annotations, CATEGORIES), sizes


def _reference_index(coco: COCO, image_id: int, class_of: dict[int, int]) -> np.ndarray:
    """The index mask by pycocotools' own annToMask, painted by the documented overlap rule."""
    info = coco.imgs[image_id]
    out = np.zeros((info["height"], info["width"]), np.uint8)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    masks = [(coco.annToMask(a).astype(bool), class_of[a["category_id"]] + 1) for a in anns]
    order = sorted(range(len(masks)), key=lambda k: (-int(masks[k][0].sum()), k))
    for k in order:
        out[masks[k][0]] = masks[k][1]
    return out


def test_masks_equal_pycocotools_pixel_for_pixel(tmp_path: Path) -> None:
    path, _ = _generated(tmp_path)
    aset = read_coco(path)
    assert aset.class_names == ("crack", "pit", "stain")  # names lower-cased, in the order of their ids
    coco = COCO(str(path))
    class_of = {3: 0, 7: 1, 11: 2}
    by_name = {Path(coco.imgs[i]["file_name"]).name: i for i in coco.imgs}
    result = materialize(aset)
    assert not result.reused and len(result.pairs) == 12
    kinds = set()
    for ann in coco.anns.values():
        seg = ann["segmentation"]
        kinds.add("polygon" if isinstance(seg, list) else type(seg["counts"]).__name__)
    assert kinds == {"polygon", "list", "str"}  # all three encodings are exercised
    for image, mask_path in result.pairs:
        expected = _reference_index(coco, by_name[image.name], class_of)
        got = np.zeros_like(expected) if mask_path is None else np.asarray(Image.open(mask_path))
        assert (mask_path is None) == (not expected.any())  # defect-free images get no mask file
        np.testing.assert_array_equal(got, expected, err_msg=image.name)
    free = [item for item in aset.images if item.defect_free]
    assert [item.image.name for item in free] == ["im11.png"]


def test_smaller_annotation_is_drawn_on_top_whatever_the_order(tmp_path: Path) -> None:
    big = [[2, 2, 30, 2, 30, 30, 2, 30]]
    small = [[10, 10, 16, 10, 16, 16, 10, 16]]
    for number, order in enumerate(((big, small), (small, big))):
        folder = tmp_path / f"order{number}"
        annotations = [
            {"image_id": 1, "category_id": 3 if seg is big else 7, "segmentation": seg} for seg in order
        ]
        aset = read_coco(write_coco(folder, [("a.png", 32, 32)], annotations, CATEGORIES))
        mask, problems = index_mask(aset.images[0])
        assert not problems
        assert mask[13, 13] == 2  # pit (small) on top of crack (big)
        assert mask[4, 4] == 1
    equal_a = [[0, 0, 8, 0, 8, 8, 0, 8]]
    equal_b = [[4, 0, 12, 0, 12, 8, 4, 8]]  # same area, overlapping on x 4..8
    annotations = [
        {"image_id": 1, "category_id": 3, "segmentation": equal_a},
        {"image_id": 1, "category_id": 11, "segmentation": equal_b},
    ]
    aset = read_coco(write_coco(tmp_path / "ties", [("a.png", 16, 16)], annotations, CATEGORIES))
    mask, _ = index_mask(aset.images[0])
    assert mask[4, 6] == 3  # equal areas: the later annotation is on top


def test_second_run_reuses_the_cache_and_an_edit_makes_a_new_one(tmp_path: Path, _cache: Path) -> None:
    path, _ = _generated(tmp_path)
    first = materialize(read_coco(path))
    second = materialize(read_coco(path))
    assert second.reused and second.folder == first.folder and second.pairs == first.pairs
    assert (first.folder / PAIRS_FILE).is_file() and (first.folder / "classes.txt").read_text() == (
        "crack\npit\nstain\n"
    )
    assert not [p for p in first.folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    data = json.loads(path.read_text())
    data["annotations"] = data["annotations"][1:]
    path.write_text(json.dumps(data))
    third = materialize(read_coco(path))
    assert not third.reused and third.folder != first.folder


def test_resized_image_changes_the_key(tmp_path: Path) -> None:
    path, _ = _generated(tmp_path)
    key = read_coco(path).key()
    data = json.loads(path.read_text())
    data["images"][11].update(height=30, width=30)  # the defect-free image: no annotation to clip
    path.write_text(json.dumps(data))
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(tmp_path / "images" / "im11.png")
    assert read_coco(path).key() != key


def test_images_beside_the_json_or_in_images_folder(tmp_path: Path) -> None:
    path = write_coco(tmp_path, [("a.png", 16, 16)], [], CATEGORIES)
    data = json.loads(path.read_text())
    data["images"][0]["file_name"] = "a.png"  # found in images/ beside the JSON
    path.write_text(json.dumps(data))
    aset = read_coco(path)
    assert aset.images[0].image == (tmp_path / "images" / "a.png").resolve()
    assert aset.images[0].defect_free


def test_classes_txt_beside_the_json_fixes_the_order(tmp_path: Path) -> None:
    path = write_coco(tmp_path, [("a.png", 16, 16)], [], CATEGORIES)
    (tmp_path / "classes.txt").write_text("stain\nscratch\npit\ncrack\n")
    assert read_coco(path).class_names == ("stain", "scratch", "pit", "crack")
    (tmp_path / "classes.txt").write_text("stain\npit\n")
    with pytest.raises(DliError, match=r"categories crack are not listed in .*classes.txt"):
        read_coco(path)


def _error_lines(path: Path) -> list[str]:
    with pytest.raises(DliError) as caught:
        materialize(read_coco(path))
    return str(caught.value).splitlines()


def test_every_bad_annotation_is_named_at_once(tmp_path: Path) -> None:
    square = [[1, 1, 8, 1, 8, 8, 1, 8]]
    annotations = [
        {"image_id": 1, "category_id": 3, "segmentation": square},  # fine
        {"image_id": 2, "category_id": 99, "segmentation": square},  # unknown category id
        {"image_id": 1, "category_id": 7, "segmentation": [[1, 1, 40, 1, 40, 8]]},  # outside 16 px
        {"image_id": 1, "category_id": 7, "segmentation": []},  # empty
        {"image_id": 1, "category_id": 7, "segmentation": [[1, 1, 5]]},  # odd coordinates
        {"image_id": 1, "category_id": 7, "segmentation": {"counts": [3, 4], "size": [16, 16]}},  # short RLE
        {"image_id": 1, "category_id": 7, "segmentation": {"counts": [256], "size": [8, 32]}},  # wrong size
        {"image_id": 9, "category_id": 3, "segmentation": square},  # unknown image
    ]
    path = write_coco(
        tmp_path, [("a.png", 16, 16), ("b.png", 16, 16), ("c.png", 16, 16)], annotations, CATEGORIES
    )
    (tmp_path / "images" / "c.png").unlink()  # listed, missing
    lines = _error_lines(path)
    assert lines[0].startswith("8 problems in dataset")
    text = "\n".join(lines)
    for fault in (
        "b.png: unknown category id (annotation id 2 in annotations.json: category_id 99; "
        "the categories' ids are 3, 7, 11)",
        "a.png: polygon outside the image (annotation id 3",
        "a.png: empty segmentation (annotation id 4",
        "a.png: bad polygon (annotation id 5",
        "a.png: bad RLE (annotation id 6",
        "a.png: RLE size mismatch (annotation id 7",
        "annotations.json: annotation of an unknown image id (annotation id 8",
        "c.png: missing image (image id 3 in annotations.json)",
    ):
        assert fault in text, fault


def test_zero_area_polygon_is_an_empty_segmentation(tmp_path: Path) -> None:
    flat = [[2, 2, 10, 2.2, 18, 2.4]]  # collinear, below a pixel: pycocotools draws nothing
    annotations = [{"image_id": 1, "category_id": 3, "segmentation": flat}]
    path = write_coco(tmp_path, [("a.png", 16, 24)], annotations, CATEGORIES)
    lines = _error_lines(path)
    assert "a.png: empty segmentation (annotation id 1 in annotations.json: no pixel inside)" in lines[1]
    assert not list((tmp_path.parent / "cache").glob("**/images.csv"))  # nothing cached


def test_declared_size_must_match_the_image(tmp_path: Path) -> None:
    path = write_coco(tmp_path, [("a.png", 16, 16)], [], CATEGORIES)
    data = json.loads(path.read_text())
    data["images"][0]["width"] = 20
    path.write_text(json.dumps(data))
    assert "a.png: image size differs (16x16, but annotations.json says 20x16)" in "\n".join(
        _error_lines(path)
    )


def test_not_a_coco_file(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"shapes": []}')
    with pytest.raises(DliError, match="not a COCO file"):
        read_coco(path)
    path.write_text("{broken")
    with pytest.raises(DliError, match="not valid JSON"):
        read_coco(path)


def test_a_moved_dataset_reuses_its_masks_with_its_new_paths(tmp_path: Path) -> None:
    import shutil

    path, _ = _generated(tmp_path / "here")
    first = materialize(read_coco(path))
    shutil.move(tmp_path / "here", tmp_path / "there")
    moved = materialize(read_coco(tmp_path / "there" / "annotations.json"))
    assert moved.reused and moved.folder == first.folder
    assert all(image.is_file() and str(image).startswith(str(tmp_path / "there")) for image, _ in moved.pairs)
    assert [m for _, m in moved.pairs] == [m for _, m in first.pairs]


def test_two_links_to_one_file_are_two_images(tmp_path: Path) -> None:
    path = write_coco(tmp_path, [("a.png", 16, 16)], [], CATEGORIES)
    (tmp_path / "images" / "b.png").symlink_to(tmp_path / "images" / "a.png")
    data = json.loads(path.read_text())
    data["images"].append({"id": 2, "file_name": "images/b.png", "height": 16, "width": 16})
    path.write_text(json.dumps(data))
    assert [item.image.name for item in read_coco(path).images] == ["a.png", "b.png"]
