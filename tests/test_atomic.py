"""wakd.atomic: a target is either its old or its new content, and no temporary file stays."""

from __future__ import annotations

import errno
import json
import stat
from pathlib import Path

import pytest

from wakd.atomic import atomic_write_bytes, atomic_write_json, atomic_write_path, atomic_write_text


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_success_replaces_the_target_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "new" / "sub" / "out.bin"  # missing parents are created
    with atomic_write_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".out.bin.") and tmp.name.endswith(".tmp")
        assert not target.exists()  # nothing visible under the target's name while writing
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert _names(target.parent) == ["out.bin"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not mkstemp's owner-only 0600


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_failure_keeps_the_old_file_and_removes_the_temp(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(type(error)), atomic_write_path(target) as tmp:
        tmp.write_bytes(b"half of the n")
        raise error
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["out.bin"]


def test_failure_without_a_previous_file_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_write_path(tmp_path / "out.bin"):
        raise RuntimeError("writer crashed before writing")
    assert _names(tmp_path) == []


def test_bytes_text_and_json(tmp_path: Path) -> None:
    assert atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01") == tmp_path / "a.bin"
    atomic_write_text(tmp_path / "b.txt", "Recall@1 — 85 %")
    atomic_write_json(tmp_path / "c.json", {"recall": {"1": 0.5}})
    atomic_write_json(tmp_path / "c.json", {"recall": {"1": 0.75}})  # overwrite
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "Recall@1 — 85 %"
    text = (tmp_path / "c.json").read_text()
    assert json.loads(text) == {"recall": {"1": 0.75}} and text.endswith("}\n")
    assert _names(tmp_path) == ["a.bin", "b.txt", "c.json"]
