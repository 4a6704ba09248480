"""labelme JSON: labelme's pixel convention, defect-free images, every bad file named."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dli.common.errors import DliError
from dli.data.annotations import index_mask, materialize
from dli.data.labelme import LabelmeShape, read_labelme


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLI_CACHE", str(tmp_path / "cache"))


def _image(path: Path, h: int, w: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(path)
    return path


def _labelme(
    image: Path, shapes: list[tuple[str, str, list]], h: int | None = None, w: int | None = None
) -> Path:
    """A labelme file beside `image` with (label, shape_type, points) shapes."""
    with Image.open(image) as opened:
        width, height = opened.size
    data = {
        "version": "5.5.0",
        "flags": {},
        "shapes": [
            {"label": label, "points": points, "group_id": None, "shape_type": kind, "flags": {}}
            for label, kind, points in shapes
        ],
        "imagePath": image.name,
        "imageData": None,
        "imageHeight": height if h is None else h,
        "imageWidth": width if w is None else w,
    }
    path = image.with_suffix(".json")
    path.write_text(json.dumps(data))
    return path


def _pixels(kind: str, points: list, h: int = 40, w: int = 40) -> np.ndarray:
    return LabelmeShape(0, "", kind, tuple(map(tuple, points))).mask(h, w)


def test_rectangle_covers_its_corners_inclusively_in_any_order() -> None:
    for points in ([[3, 5], [10, 8]], [[10, 8], [3, 5]], [[10, 5], [3, 8]]):
        mask = _pixels("rectangle", points)
        ys, xs = np.nonzero(mask)
        assert (ys.min(), ys.max(), xs.min(), xs.max()) == (5, 8, 3, 10)
        assert mask.sum() == 4 * 8


def test_polygon_with_integer_vertices_fills_its_closed_area() -> None:
    mask = _pixels("polygon", [[2, 2], [12, 2], [12, 6], [2, 6]])
    expected = np.zeros((40, 40), bool)
    expected[2:7, 2:13] = True  # PIL: outline pixels included, pixel (x, y) centred on integer x, y
    np.testing.assert_array_equal(mask, expected)
    assert _pixels(None, [[2, 2], [12, 2], [12, 6], [2, 6]]).sum() == mask.sum()  # type: ignore[arg-type]


def test_circle_point_and_line_sizes() -> None:
    circle = _pixels("circle", [[20, 20], [20, 28]])  # radius 8
    assert abs(circle.sum() - math.pi * 8.5**2) < 0.1 * math.pi * 64
    around = circle[12:29, 12:29]  # rows and columns 20 - 8 .. 20 + 8
    assert around.sum() == circle.sum()
    np.testing.assert_array_equal(around, around[::-1, :])  # symmetric about the centre row ...
    np.testing.assert_array_equal(around, around[:, ::-1])  # ... and column
    point = _pixels("point", [[20, 20]])  # labelme's radius 5
    ys, xs = np.nonzero(point)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (15, 25, 15, 25)
    line = _pixels("line", [[5, 20], [35, 20]])  # labelme's width 10
    assert line[:, 20].sum() == 10 or line[:, 20].sum() == 11
    assert line.any(axis=0)[5:36].all() and not line.any(axis=0)[:4].any()


def _dataset(root: Path) -> Path:
    a = _image(root / "defects" / "a.jpg", 40, 48)
    _labelme(
        a,
        [
            ("Scratch", "polygon", [[2, 2], [30, 2], [30, 30], [2, 30]]),
            ("pit", "circle", [[10, 10], [10, 13]]),
        ],
    )
    b = _image(root / "defects" / "b.png", 40, 40)
    _labelme(b, [("dent", "rectangle", [[30, 30], [5, 5]])])
    c = _image(root / "defects" / "c.jpg", 40, 40)
    _labelme(c, [])  # a labelme file with no shapes: defect-free
    _image(root / "good" / "d.jpg", 30, 30)  # no JSON, in a `good` folder
    _image(root / "e.jpg", 30, 30)  # no JSON, listed in free.txt
    (root / "free.txt").write_text("# reviewed, nothing found\ne.jpg\n")
    return root


def test_reads_classes_shapes_and_defect_free_images(tmp_path: Path) -> None:
    aset = read_labelme(_dataset(tmp_path / "data"))
    assert aset.class_names == ("dent", "pit", "scratch")  # labels lower-cased and sorted
    by_name = {item.image.name: item for item in aset.images}
    assert sorted(by_name) == ["a.jpg", "b.png", "c.jpg", "d.jpg", "e.jpg"]
    assert {n for n, item in by_name.items() if item.defect_free} == {"c.jpg", "d.jpg", "e.jpg"}
    mask, problems = index_mask(by_name["a.jpg"])
    assert not problems and mask.shape == (40, 48)
    assert mask[10, 10] == 2  # the pit (small circle) lies on top of the scratch polygon
    assert mask[25, 25] == 3 and mask[35, 40] == 0
    result = materialize(aset)
    masks = {image.name: np.asarray(Image.open(mask)) for image, mask in result.pairs if mask is not None}
    assert sorted(masks) == ["a.jpg", "b.png"]  # defect-free images have no mask file
    np.testing.assert_array_equal(masks["a.jpg"], mask)
    assert masks["b.png"][5:31, 5:31].min() == 1 and masks["b.png"].sum() == 26 * 26
    held = {image.name: classes for (image, _), classes in zip(result.pairs, result.classes, strict=True)}
    assert held == {"a.jpg": (1, 2), "b.png": (0,), "c.jpg": (), "d.jpg": (), "e.jpg": ()}
    again = materialize(read_labelme(tmp_path / "data"))
    assert again.reused and again.classes == result.classes and again.pairs == result.pairs


def test_classes_txt_fixes_the_order_and_rejects_unlisted_labels(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data")
    (root / "classes.txt").write_text("scratch\npit\ndent\nfray\n")
    assert read_labelme(root).class_names == ("scratch", "pit", "dent", "fray")
    (root / "classes.txt").write_text("scratch\npit\n")
    with pytest.raises(
        DliError, match=r"\.json: unknown class \('dent' \(shape \d+\): not listed in .*classes.txt"
    ) as caught:
        read_labelme(root)
    named = [line for line in str(caught.value).splitlines() if "'dent'" in line]
    assert named and all(".json" in line for line in named)  # each file that uses it, by its path


def test_every_bad_file_is_named_at_once(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data")
    _labelme(_image(root / "defects" / "wide.jpg", 40, 40), [("pit", "point", [[5, 5]])], w=64)
    _image(root / "defects" / "unlabelled.jpg", 20, 20)
    _labelme(
        _image(root / "defects" / "outside.jpg", 20, 20), [("pit", "polygon", [[1, 1], [60, 1], [1, 9]])]
    )
    _labelme(
        _image(root / "defects" / "shapes.jpg", 20, 20),
        [("pit", "polygon", [[1, 1], [5, 5]]), ("pit", "mask", [[1, 1], [5, 5]])],
    )
    (root / "defects" / "other.json").write_text("[1, 2]")
    _labelme(_image(root / "good" / "annotated.jpg", 20, 20), [("pit", "point", [[5, 5]])])
    with pytest.raises(DliError) as caught:
        read_labelme(root)
    lines = str(caught.value).splitlines()
    text = "\n".join(lines)
    assert lines[0].startswith("7 problems in dataset")
    for fault in (
        "wide.json: image size differs (imageWidth 64 in wide.json, the image has 40)",
        "unlabelled.jpg: image without a labelme file (not in a free/ok/good folder nor in free.txt)",
        "outside.json: polygon outside the image (shape 0:",
        "shapes.json: bad shape (shape 0: a polygon has 2 points, needs at least 3)",
        "shapes.json: unsupported shape type (shape 1: 'mask'",
        "other.json: not a labelme file",
        "annotated.json: annotated image marked defect-free (annotated.jpg)",
    ):
        assert fault in text, fault


def test_missing_image_and_free_list_entry(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data")
    (root / "defects" / "b.png").unlink()
    (root / "free.txt").write_text("e.jpg\ngone.jpg\n")
    with pytest.raises(DliError) as caught:
        read_labelme(root)
    text = str(caught.value)
    assert "b.png: missing image (named by b.json)" in text
    assert "gone.jpg: missing image (line 2 of free.txt)" in text


def test_shape_with_no_pixel_is_an_empty_segmentation(tmp_path: Path) -> None:
    root = tmp_path / "data"
    image = _image(root / "a.jpg", 20, 20)
    _labelme(image, [("pit", "polygon", [[21, 5], [21, 9], [20.6, 7]])])  # inside the tolerance, no pixel
    with pytest.raises(
        DliError, match=r"a.jpg: empty segmentation \(shape 0 \(pit\) in a.json: no pixel inside\)"
    ):
        materialize(read_labelme(root))


def test_a_coco_file_in_the_folder_is_named_as_such(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data")
    (root / "_annotations.coco.json").write_text('{"images": [], "annotations": [], "categories": []}')
    with pytest.raises(
        DliError, match=r"_annotations.coco.json: not a labelme file \(a COCO file: train with --data"
    ):
        read_labelme(root)


def test_matches_labelme_itself_when_installed() -> None:
    """labelme's own `shape_to_mask` on random shapes of every type, where labelme is installed (the
    project does not depend on it: a one-off run against labelme 6.3.1 found 3,000 shapes identical)."""
    shape_module = pytest.importorskip("labelme.utils.shape", reason="labelme is not installed")
    rng = np.random.default_rng(0)
    kinds = {"polygon": 6, "rectangle": 2, "circle": 2, "line": 2, "linestrip": 4, "point": 1}
    for number in range(120):
        kind = list(kinds)[number % len(kinds)]
        h, w = int(rng.integers(8, 60)), int(rng.integers(8, 60))
        points = rng.uniform(-1, [w + 1, h + 1], size=(kinds[kind], 2)).round(1).tolist()
        expected = shape_module.shape_to_mask((h, w), points, kind)
        np.testing.assert_array_equal(_pixels(kind, points, h, w), expected, err_msg=f"{kind} {points}")
