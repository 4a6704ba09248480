"""COCO and labelme through `read_dataset` and `dli train --data`: the same samples as index masks."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from dli.cli import main
from dli.common.errors import DliError
from dli.data.manifest import read_dataset
from dli.data.synth_formats import SynthOptions, data_path, generate_formatted
from dli.data.validation import validate

SMALL = ((40, 64), (40, 80))


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLI_CACHE", str(tmp_path / "cache"))


def _write(out: Path, fmt: str, free: bool = True) -> Path:
    options = SynthOptions(fmt=fmt, classes_per_image=3, free=free)
    generate_formatted(out, images=24, seed=3, size_range=SMALL, options=options)
    return data_path(out, options)


@pytest.mark.parametrize("fmt", ["coco", "labelme"])
def test_read_dataset_gives_the_index_route_samples(tmp_path: Path, fmt: str) -> None:
    index = read_dataset(_write(tmp_path / "idx", "index"))
    annotated = read_dataset(_write(tmp_path / fmt, fmt))
    assert annotated.class_names == index.class_names
    by_stem = {s.image.stem: s for s in index.samples}
    same = sum(by_stem[s.image.stem].classes == s.classes for s in annotated.samples)
    assert len(annotated) == 24 and same >= 22
    assert any(len(s.classes) > 1 for s in annotated.samples)
    for sample in annotated.samples:
        assert (sample.mask is None) == sample.is_free  # defect-free images carry no mask
        assert sample.index_bits == (0 if sample.is_free else 8)
    report = validate(annotated)
    assert report.ok and sum(map(len, report.instances)) > 0


def test_a_folder_of_class_folders_is_not_taken_for_labelme(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    generate_formatted(root, images=12, seed=0, size_range=SMALL, options=SynthOptions(fmt="mt", rgb=True))
    (root / "notes.json").write_text("{}")  # a stray JSON beside MT_<Class>/Imgs/ folders
    assert read_dataset(root).num_classes == 5


def test_bad_annotations_stop_read_dataset_with_every_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "c", "coco")
    (tmp_path / "c" / "images" / "synth_0003.jpg").unlink()
    with pytest.raises(DliError, match=r"synth_0003.jpg: missing image"):
        read_dataset(path)


@pytest.mark.slow
def test_dli_trains_on_coco_without_free_images(tmp_path: Path) -> None:
    data = _write(tmp_path / "c", "coco", free=False)
    argv = ["train", "--data", str(data), "--method", "dli", "--epochs", "1", "--max-steps", "2"]
    argv += ["--batch-size", "4", "--image-size", "32", "--no-pretrained", "--device", "cpu"]
    argv += ["--num-threads", "1", "--out", str(tmp_path / "run"), "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 0
    assert (tmp_path / "run" / "last.pt").is_file()


def test_dli_train_names_every_bad_annotation_and_exits_2(tmp_path: Path, capsys) -> None:
    path = _write(tmp_path / "c", "coco")
    data = json.loads(path.read_text())
    data["annotations"][0]["segmentation"] = []
    data["annotations"][1]["category_id"] = 77
    path.write_text(json.dumps(data))
    argv = ["train", "--data", str(path), "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "dli train: error: 2 problems in dataset" in err
    assert "empty segmentation" in err and "unknown category id" in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_an_incomplete_cache_folder_is_replaced(tmp_path: Path) -> None:
    from dli.data.annotations import materialize, read_annotations

    aset = read_annotations(_write(tmp_path / "c", "coco"))
    first = materialize(aset)
    (first.folder / "images.csv").unlink()  # a folder without its list: not complete, not reused
    second = materialize(aset)
    assert not second.reused and (second.folder / "images.csv").is_file()
    third = materialize(aset)
    assert third.reused and third.pairs == first.pairs
