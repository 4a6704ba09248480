"""Dataset readers (folder per class, CSV, reference split CSV), CSV writing and validation."""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dli.common.errors import DliError
from dli.data.csv_manifest import write_csv
from dli.data.imageio import read_gray, read_mask
from dli.data.manifest import FREE, MT_CLASSES, DatasetWarning, Manifest, Sample, read_dataset
from dli.data.validation import validate

SIZE = (24, 16)  # (W, H) as PIL wants it


def write_image(path: Path, size: tuple[int, int] = SIZE, value: int = 110) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name))
    pixels = np.clip(value + rng.integers(-20, 20, (size[1], size[0])), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(path)
    return path


def write_mask(
    path: Path, size: tuple[int, int] = SIZE, box: tuple[int, int, int, int] | None = (2, 2, 6, 6)
) -> Path:
    """A 0/255 mask with `box` (x0, y0, x1, y1, exclusive) set; None gives an empty mask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((size[1], size[0]), dtype=np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        pixels[y0:y1, x0:x1] = 255
    Image.fromarray(pixels, mode="L").save(path)
    return path


def make_mt(root: Path, per_class: dict[str, int]) -> Path:
    """An MT-layout dataset: `MT_<Name>/Imgs/<name>_<i>.jpg` + `.png` mask for each class."""
    for folder, n in per_class.items():
        for i in range(n):
            image = write_image(root / folder / "Imgs" / f"{folder.lower()}_{i}.jpg")
            write_mask(image.with_suffix(".png"), box=None if folder == "MT_Free" else (2, 2, 6, 6))
    return root


@pytest.fixture
def mt_like(tmp_path: Path) -> Path:
    return make_mt(tmp_path / "mt", {"MT_Blowhole": 2, "MT_Crack": 3, "MT_Free": 4})


# ---------------------------------------------------------------------------------------------
# Readers.


def test_reads_mt_layout_with_mt_class_ids(mt_like: Path):
    manifest = read_dataset(mt_like)
    assert manifest.class_names == MT_CLASSES  # MT ids even though break/fray/uneven are absent
    assert manifest.root == mt_like
    assert manifest.counts_by_name() == {
        "blowhole": 2,
        "break": 0,
        "crack": 3,
        "fray": 0,
        "uneven": 0,
        "free": 4,
    }
    assert manifest.empty_classes() == ["break", "fray", "uneven"]
    for sample in manifest.samples:
        assert sample.image.suffix == ".jpg" and sample.mask == sample.image.with_suffix(".png")
    crack = [s for s in manifest.samples if s.class_id == MT_CLASSES.index("crack")]
    assert [s.image.name for s in crack] == ["mt_crack_0.jpg", "mt_crack_1.jpg", "mt_crack_2.jpg"]


def test_free_image_without_mask_file_has_no_mask(mt_like: Path):
    (mt_like / "MT_Free" / "Imgs" / "mt_free_0.png").unlink()
    manifest = read_dataset(mt_like)
    free = {s.image.name: s.mask for s in manifest.samples if s.class_id == FREE}
    assert free["mt_free_0.jpg"] is None and free["mt_free_1.jpg"] is not None


def test_custom_folders_get_sorted_names_without_shared_prefix(tmp_path: Path):
    root = make_mt(tmp_path / "ks", {"KS_Scratch": 2, "KS_Dent": 1, "KS_Good": 3})
    manifest = read_dataset(root)
    assert manifest.class_names == ("dent", "scratch")
    assert manifest.counts_by_name() == {"dent": 1, "scratch": 2, "free": 3}


def test_unprefixed_folders_keep_their_names(tmp_path: Path):
    root = make_mt(tmp_path / "plain", {"oil_spot": 1, "Scratch": 1, "ok": 2})
    manifest = read_dataset(root)
    assert manifest.class_names == ("oil_spot", "scratch")
    assert manifest.counts()[FREE] == 2


def test_classes_txt_fixes_the_order_and_may_list_empty_classes(tmp_path: Path):
    root = make_mt(tmp_path / "ks", {"KS_Scratch": 2, "KS_Dent": 1, "KS_Good": 1})
    (root / "classes.txt").write_text("# defect classes\nscratch\nhole\ndent\n")
    manifest = read_dataset(root)
    assert manifest.class_names == ("scratch", "hole", "dent")
    assert manifest.counts() == {FREE: 1, 0: 2, 1: 0, 2: 1}


def test_class_names_argument_wins_and_unknown_folder_is_an_error(tmp_path: Path):
    root = make_mt(tmp_path / "ks", {"KS_Scratch": 1, "KS_Dent": 1, "KS_Good": 1})
    assert read_dataset(root, class_names=["Dent", "scratch"]).class_names == ("dent", "scratch")
    with pytest.raises(DliError) as error:
        read_dataset(root, class_names=["scratch"])
    message = str(error.value)
    assert message.startswith("1 problem in dataset") and "KS_Dent" in message and "'dent'" in message


def test_two_free_folders_are_rejected(tmp_path: Path):
    root = make_mt(tmp_path / "x", {"Good": 1, "OK": 1, "Dent": 1})
    with pytest.raises(DliError, match="more than one defect-free folder"):
        read_dataset(root)


def test_png_images_take_their_mask_from_the_mask_suffix(tmp_path: Path):
    imgs = tmp_path / "d" / "Dent" / "Imgs"
    write_image(imgs / "a.png")
    write_mask(imgs / "a_mask.png")
    write_image(imgs / "b.jpg")
    write_mask(imgs / "b.png")  # mask of b.jpg, not an image
    write_image(tmp_path / "d" / "Free" / "Imgs" / "c.png")  # free PNG without a mask
    manifest = read_dataset(tmp_path / "d")
    pairs = {s.image.name: (s.mask.name if s.mask else None) for s in manifest.samples}
    assert pairs == {"a.png": "a_mask.png", "b.jpg": "b.png", "c.png": None}


def test_images_sharing_a_stem_are_ambiguous(tmp_path: Path):
    imgs = tmp_path / "d" / "Dent" / "Imgs"
    write_image(imgs / "a.jpg")
    write_image(imgs / "a.bmp")
    with pytest.raises(DliError) as error:
        read_dataset(tmp_path / "d")
    assert "a.jpg" in str(error.value) and "a.bmp" in str(error.value)


def test_not_a_dataset_errors_name_the_path(tmp_path: Path):
    with pytest.raises(DliError, match="dataset not found"):
        read_dataset(tmp_path / "nope")
    with pytest.raises(DliError, match="no class folders"):
        read_dataset(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DliError, match=r"notes\.txt"):
        read_dataset(tmp_path / "notes.txt")


# ---------------------------------------------------------------------------------------------
# CSV.


def test_csv_round_trip_keeps_samples_and_class_order(tmp_path: Path, mt_like: Path):
    (mt_like / "MT_Free" / "Imgs" / "mt_free_0.png").unlink()
    manifest = read_dataset(mt_like)
    csv_path = tmp_path / "lists" / "all.csv"
    write_csv(manifest, csv_path)
    first_rows = csv_path.read_text().splitlines()[:2]
    assert first_rows[0] == "image,mask,class"
    assert first_rows[1].startswith("../mt/MT_Blowhole/Imgs/")
    assert (csv_path.parent / "classes.txt").read_text().split() == list(MT_CLASSES)
    again = read_dataset(csv_path)
    assert again.samples == manifest.samples
    assert again.class_names == manifest.class_names
    assert again.root == csv_path.parent


def test_csv_keeps_custom_order_through_classes_txt(tmp_path: Path):
    samples = (Sample(write_image(tmp_path / "a.jpg"), write_mask(tmp_path / "a.png"), 1),)
    manifest = Manifest(samples, ("zeta", "alpha"), tmp_path)
    write_csv(manifest, tmp_path / "m.csv")
    assert read_dataset(tmp_path / "m.csv").class_names == ("zeta", "alpha")
    other = Manifest(samples, ("alpha", "zeta"), tmp_path)
    with pytest.raises(DliError, match=r"classes\.txt"):
        write_csv(other, tmp_path / "other.csv")


def test_hand_written_csv(tmp_path: Path):
    write_image(tmp_path / "img" / "a.jpg")
    write_mask(tmp_path / "img" / "a.png")
    write_image(tmp_path / "img" / "b.jpg")
    (tmp_path / "list.csv").write_text("image,mask,class\nimg/a.jpg,img/a.png,Scratch\nimg/b.jpg,,free\n")
    manifest = read_dataset(tmp_path / "list.csv")
    assert manifest.class_names == ("scratch",)
    assert manifest.samples == (
        Sample(tmp_path / "img" / "a.jpg", tmp_path / "img" / "a.png", 0),
        Sample(tmp_path / "img" / "b.jpg", None, FREE),
    )


def test_csv_row_problems_are_listed_together(tmp_path: Path):
    (tmp_path / "classes.txt").write_text("scratch\n")
    (tmp_path / "list.csv").write_text(
        "image,mask,class\n"
        "a.jpg,a.png,dent\n"  # unknown class
        "b.jpg,,scratch\n"  # defect without mask
        "c.jpg,c.png,dent\n"  # unknown class
        "d.jpg,,free\n"
        "d.jpg,,free\n"  # duplicate
    )
    with pytest.raises(DliError) as error:
        read_dataset(tmp_path / "list.csv")
    lines = str(error.value).splitlines()
    assert lines[0].startswith("4 problems in dataset") and "2 unknown class" in lines[0]
    assert len(lines) == 5
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        assert any(name in line for line in lines[1:]), name
    assert "row 2 of list.csv" in lines[1]
    assert any("d.jpg: listed twice" in line and "rows 5 and 6 of list.csv" in line for line in lines)


def test_csv_with_unknown_columns(tmp_path: Path):
    (tmp_path / "x.csv").write_text("path,label\na.jpg,0\n")
    with pytest.raises(DliError, match="image,mask,class"):
        read_dataset(tmp_path / "x.csv")


def test_reference_csv_paths_are_relative_to_the_dataset_root(mt_like: Path, tmp_path: Path):
    split = mt_like / "splits" / "mine"
    split.mkdir(parents=True)
    (split / "val.csv").write_text(
        "img_fpath,mask_fpath,defect_id\n"
        "MT_Crack/Imgs/mt_crack_1.jpg,MT_Crack/Imgs/mt_crack_1.png,2\n"
        "MT_Free/Imgs/mt_free_0.jpg,MT_Free/Imgs/mt_free_0.png,-1\n"
    )
    manifest = read_dataset(split / "val.csv")
    assert manifest.root == mt_like and manifest.class_names == MT_CLASSES
    assert [(s.image.relative_to(mt_like).as_posix(), s.class_id) for s in manifest.samples] == [
        ("MT_Crack/Imgs/mt_crack_1.jpg", 2),
        ("MT_Free/Imgs/mt_free_0.jpg", FREE),
    ]
    (split / "bad.csv").write_text("img_fpath,mask_fpath,defect_id\nMT_Crack/Imgs/mt_crack_1.jpg,x.png,7\n")
    with pytest.raises(DliError, match=r"mt_crack_1.jpg: unknown class \(defect_id 7 not in -1..4"):
        read_dataset(split / "bad.csv")
    (split / "twice.csv").write_text(
        "img_fpath,mask_fpath,defect_id\n"
        "MT_Crack/Imgs/mt_crack_1.jpg,MT_Crack/Imgs/mt_crack_1.png,2\n"
        "MT_Crack/Imgs/mt_crack_2.jpg,,2\n"
        "MT_Crack/Imgs/mt_crack_1.jpg,MT_Crack/Imgs/mt_crack_1.png,2\n"
    )
    with pytest.raises(DliError) as error:
        read_dataset(split / "twice.csv")
    lines = str(error.value).splitlines()
    assert lines[0].startswith("2 problems in dataset")
    assert any("mt_crack_2.jpg: defect sample without a mask" in line and "row 3" in line for line in lines)
    assert any("mt_crack_1.jpg: listed twice" in line and "rows 2 and 4 of" in line for line in lines)


# ---------------------------------------------------------------------------------------------
# Validation.


def test_clean_dataset_validates_with_mask_fractions_and_sizes(mt_like: Path):
    manifest = read_dataset(mt_like)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = validate(manifest)
    assert report.ok and not report.warnings
    expected = [16 / (24 * 16) if s.class_id != FREE else 0.0 for s in manifest.samples]
    np.testing.assert_allclose(report.mask_fractions, expected)
    assert set(report.image_sizes) == {(16, 24)}


def test_every_problem_lands_in_one_error(mt_like: Path):
    imgs = mt_like / "MT_Crack" / "Imgs"
    (imgs / "mt_crack_0.png").unlink()  # missing mask
    (imgs / "mt_crack_1.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # corrupt image
    write_mask(imgs / "mt_crack_2.png", size=(20, 16))  # wrong size
    (mt_like / "MT_Blowhole" / "Imgs" / "mt_blowhole_0.png").write_bytes(b"garbage")  # corrupt mask
    manifest = read_dataset(mt_like)
    with pytest.raises(DliError) as error:
        validate(manifest)
    lines = str(error.value).splitlines()
    assert lines[0] == (
        f"4 problems in dataset {mt_like}: 1 unreadable mask, 1 missing mask, 1 unreadable image, "
        "1 mask size mismatch"
    )
    assert len(lines) == 5
    body = "\n".join(lines[1:])
    for name in ("mt_blowhole_0.png", "mt_crack_0.png", "mt_crack_1.jpg", "mt_crack_2.png"):
        assert name in body, name
    assert "mask 20x16, image 24x16" in body

    report = validate(manifest, raise_errors=False)
    assert not report.ok and len(report.errors) == 4
    assert math.isnan(report.mask_fractions[0])  # the unreadable mask


def test_truncated_image_is_caught_only_when_decoding(mt_like: Path):
    path = write_image(mt_like / "MT_Crack" / "Imgs" / "mt_crack_0.jpg", size=(200, 160))
    write_mask(path.with_suffix(".png"), size=(200, 160))
    data = path.read_bytes()  # large enough that its first half holds the whole header
    path.write_bytes(data[: len(data) // 2])
    manifest = read_dataset(mt_like)
    assert validate(manifest, check_pixels=False).ok
    with pytest.raises(DliError, match=r"1 problem in dataset .*: 1 unreadable image\n.*mt_crack_0.jpg"):
        validate(manifest)


def test_a_float_image_is_refused_by_name_not_read_as_black(mt_like: Path, tmp_path: Path):
    """A 32-bit float TIFF of values in [0, 1] would convert to an all-black 8-bit image."""
    path = mt_like / "MT_Crack" / "Imgs" / "mt_crack_0.tif"
    values = np.random.default_rng(0).uniform(0.2, 0.8, (160, 200)).astype(np.float32)
    Image.fromarray(values).save(path)
    for old in path.parent.glob("mt_crack_0.jpg"):
        old.unlink()
    with pytest.raises(DliError, match=r"1 unreadable image\n.*mt_crack_0.tif.*floating-point pixels"):
        validate(read_dataset(mt_like), check_pixels=False)
    with pytest.raises(DliError, match=r"cannot read image .*mt_crack_0.tif: 32-bit floating-point"):
        read_gray(path)


def test_size_mismatch_is_found_from_headers_alone(mt_like: Path):
    write_mask(mt_like / "MT_Crack" / "Imgs" / "mt_crack_0.png", size=(24, 10))
    report = validate(read_dataset(mt_like), check_pixels=False, raise_errors=False)
    assert [p.kind for p in report.errors] == ["mask size mismatch"]
    assert np.isnan(report.mask_fractions).all()


def test_empty_defect_mask_is_a_warning(mt_like: Path):
    write_mask(mt_like / "MT_Crack" / "Imgs" / "mt_crack_1.png", box=None)
    write_mask(mt_like / "MT_Crack" / "Imgs" / "mt_crack_2.png", box=None)
    with pytest.warns(DatasetWarning) as record:
        report = validate(read_dataset(mt_like))
    assert len(record) == 1
    message = str(record[0].message)
    assert (
        message.startswith("2 warnings in dataset")
        and "mt_crack_1.png" in message
        and "mt_crack_2.png" in message
    )
    assert report.ok and [p.kind for p in report.warnings] == ["empty mask", "empty mask"]


def test_defect_sample_without_mask_is_an_error(tmp_path: Path):
    manifest = Manifest((Sample(write_image(tmp_path / "a.jpg"), None, 0),), ("dent",), tmp_path)
    with pytest.raises(DliError, match=r"a\.jpg: defect sample without a mask"):
        validate(manifest)


def test_imageio_reads_gray_and_thresholds_masks(tmp_path: Path):
    pixels = np.zeros((4, 5), dtype=np.uint8)
    pixels[1, 2], pixels[3, 4] = 1, 255  # anti-aliased edge values count as defect
    Image.fromarray(pixels, mode="L").save(tmp_path / "m.png")
    mask = read_mask(tmp_path / "m.png")
    assert mask.dtype == bool and mask.shape == (4, 5) and mask.sum() == 2
    Image.new("RGB", (5, 4), (255, 0, 0)).save(tmp_path / "rgb.png")
    gray = read_gray(tmp_path / "rgb.png")
    assert gray.dtype == np.uint8 and gray.shape == (4, 5) and gray.flags.writeable
    with pytest.raises(DliError, match=r"image not found: .*none\.jpg"):
        read_gray(tmp_path / "none.jpg")
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(DliError, match=r"cannot read mask .*bad\.png"):
        read_mask(tmp_path / "bad.png")


# ---------------------------------------------------------------------------------------------
# The real Magnetic Tile data.


@pytest.mark.realdata
def test_real_mt_reads_and_validates(mt_root: Path):
    manifest = read_dataset(mt_root)
    assert len(manifest) == 1344 and manifest.class_names == MT_CLASSES
    assert manifest.counts_by_name() == {
        "blowhole": 115, "break": 85, "crack": 57, "fray": 32, "uneven": 103, "free": 952,
    }  # fmt: skip
    start = time.perf_counter()
    with pytest.warns(DatasetWarning, match="4 warnings in dataset .*: 4 empty mask"):
        report = validate(manifest)
    elapsed = time.perf_counter() - start
    assert report.ok
    # Four MT_Uneven masks are empty in the released data.
    assert {p.path.parent.parent.name for p in report.warnings} == {"MT_Uneven"}
    fractions = report.mask_fractions
    medians = [
        float(np.median(fractions[idx])) for c, idx in manifest.indices_by_class().items() if c != FREE
    ]
    np.testing.assert_allclose(medians, [0.0015, 0.0138, 0.0045, 0.158, 0.247], rtol=0.03)
    assert np.all(fractions[manifest.indices_by_class()[FREE]] == 0)
    print(f"validated {len(manifest)} images in {elapsed:.2f} s")
