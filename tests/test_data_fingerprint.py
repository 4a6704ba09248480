"""`--resume` refuses a changed dataset: replaced (same size), added and removed files, and old records.

A replaced image here is another image of the dataset padded with zeros to the replaced one's
size: the same size in bytes, a different picture, and still a valid JPEG (decoders stop at its
end marker), so only a content fingerprint can tell.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from dli.cli import main
from dli.common.errors import DliError
from dli.data.synth import generate
from dli.training.config import TrainConfig
from dli.training.datasets import check_same_data, data_record, file_fingerprint, load_datasets
from dli.training.trainer import train


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth"
    generate(root, images=40, seed=5, size_range=((64, 64), (64, 64)))  # one size: masks fit any image
    return root


@pytest.fixture
def copy(data: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(data, tmp_path / "data"))


def replace_with_another_of_the_same_size(victim: Path) -> None:
    """Overwrite `victim` with a smaller image of the same folder padded to `victim`'s size."""
    size = victim.stat().st_size
    donor = next(p for p in sorted(victim.parent.glob("*.jpg")) if p.stat().st_size < size)
    victim.write_bytes(donor.read_bytes().ljust(size, b"\0"))
    assert victim.stat().st_size == size


def largest(folder: Path) -> Path:
    return max(folder.glob("*.jpg"), key=lambda p: p.stat().st_size)


def record(root: Path) -> dict:
    return data_record(load_datasets(str(root), "stratified", seed=0))


def refusal(now: dict, saved: dict) -> str:
    with pytest.raises(DliError) as error:
        check_same_data(now, saved, Path("run/last.pt"))
    message = str(error.value)
    assert len(message.splitlines()) == 1 and message.startswith("cannot resume run/last.pt: the dataset")
    return message


def test_the_fingerprint_sees_a_same_size_replacement_and_not_a_copy(copy, tmp_path):
    victim = largest(copy / "MT_Crack" / "Imgs")
    shutil.copy2(victim, tmp_path / "same.jpg")
    assert file_fingerprint(tmp_path / "same.jpg") == file_fingerprint(victim)
    before = file_fingerprint(victim)
    replace_with_another_of_the_same_size(victim)
    assert file_fingerprint(victim) != before
    assert file_fingerprint(victim).split(":")[0] == before.split(":")[0]  # the sizes agree
    big = tmp_path / "big.bin"  # a change in the middle of a large file is not seen (cheap by design)
    big.write_bytes(bytes(100_000))
    first = file_fingerprint(big)
    big.write_bytes(bytes(16 * 1024) + b"\1" + bytes(100_000 - 16 * 1024 - 1))
    assert file_fingerprint(big) == first
    big.write_bytes(bytes(100_000 - 1) + b"\1")
    assert file_fingerprint(big) != first
    assert file_fingerprint(None) == "0" and file_fingerprint(tmp_path / "missing") == "-1"


def test_replaced_added_and_removed_images_are_each_named(copy):
    saved = record(copy)
    check_same_data(record(copy), saved, Path("run/last.pt"))  # unchanged: resumes
    images = sorted((copy / "MT_Crack" / "Imgs").glob("*.jpg"), key=lambda p: p.stat().st_size)
    replace_with_another_of_the_same_size(images[-1])
    assert f"1 changed (MT_Crack/Imgs/{images[-1].name})" in refusal(record(copy), saved)
    shutil.copy2(images[0], images[0].with_name("extra.jpg"))
    shutil.copy2(images[0].with_suffix(".png"), images[0].with_name("extra.png"))
    message = refusal(record(copy), saved)
    assert "1 added (MT_Crack/Imgs/extra.jpg)" in message and "1 changed" in message
    images[1].unlink()
    images[1].with_suffix(".png").unlink()
    assert f"1 removed (MT_Crack/Imgs/{images[1].name})" in refusal(record(copy), saved)


def test_a_record_of_sizes_only_still_resumes_and_still_refuses_a_removed_image(copy):
    """Runs started before content fingerprints stored `class|image size|mask size` per sample."""
    now = record(copy)

    def sizes(entry: str) -> str:
        return "|".join(part.split(":")[0] for part in entry.split("|"))

    old = {part: {k: sizes(v) for k, v in now[part].items()} for part in ("train", "val")}
    assert all(v.count("|") == 2 and ":" not in v for v in old["train"].values())
    check_same_data(now, old, Path("run/last.pt"))
    victim = sorted((copy / "MT_Free" / "Imgs").glob("*.jpg"))[0]
    victim.unlink()
    assert "1 removed" in refusal(record(copy), old)


def test_resume_refuses_an_image_replaced_by_another_of_the_same_size(
    copy, tmp_path, capsys, small: Callable[..., TrainConfig]
):
    out = tmp_path / "run"
    train(small(copy, out, epochs=2, max_steps=1, method="bce"))
    victim = largest(copy / "MT_Free" / "Imgs")
    replace_with_another_of_the_same_size(victim)
    flags = [
        "train", "--data", str(copy), "--out", str(out), "--epochs", "2", "--batch-size", "8",
        "--image-size", "64", "--no-pretrained", "--no-progress", "--num-threads", "1", "--method", "bce",
        "--resume",
    ]  # fmt: skip
    assert main(flags) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("dli train: error:")]
    assert "dataset changed" in line and "1 changed" in line and victim.name in line
