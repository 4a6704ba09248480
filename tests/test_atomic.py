"""Atomic writes: permissions of the written file, and no temp files left behind."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from dli.common import atomic
from dli.common.atomic import atomic_open, atomic_save, atomic_write_bytes, atomic_write_text
from dli.common.errors import DliError


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_file_gets_the_default_mode(tmp_path: Path, umask_022: None) -> None:
    atomic_write_text(tmp_path / "a.txt", "hello")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic_save(tmp_path / "sub" / "c.bin", lambda handle: handle.write(b"c"))
    for name in ("a.txt", "b.bin", "sub/c.bin"):
        assert mode_of(tmp_path / name) == 0o644, name
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "sub"]
    # The same as a plain open(path, "w") under this umask.
    plain = tmp_path / "plain.txt"
    with open(plain, "w") as handle:
        handle.write("x")
    assert mode_of(plain) == mode_of(tmp_path / "a.txt")


def test_umask_fallback_when_proc_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask_022: None
) -> None:
    real_open = open

    def no_proc(file, *args, **kwargs):
        if str(file) == "/proc/self/status":
            raise FileNotFoundError(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_proc)
    monkeypatch.setattr(atomic, "_IMPORT_UMASK", 0o027)
    atomic_write_text(tmp_path / "a.txt", "x")
    assert mode_of(tmp_path / "a.txt") == 0o640


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644])
def test_existing_file_keeps_its_mode(tmp_path: Path, mode: int, umask_022: None) -> None:
    path = tmp_path / "result.json"
    path.write_text("old")
    path.chmod(mode)
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert mode_of(path) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


@pytest.mark.parametrize("mode", [0o444, 0o400])
def test_a_read_only_file_is_never_replaced(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "best.pt"
    path.write_text("old")
    path.chmod(mode)
    with pytest.raises(DliError, match=r"cannot write .*best\.pt: the file is read-only"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and mode_of(path) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old")

    def failing_writer(handle) -> None:
        handle.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save(path, failing_writer)
    with pytest.raises(KeyboardInterrupt), atomic_open(tmp_path / "new.txt") as handle:
        handle.write("partial")
        raise KeyboardInterrupt
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
