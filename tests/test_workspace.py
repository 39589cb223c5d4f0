"""Artifacts are written whole or not at all, with normal file modes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from harmtrace.workspace import Workspace, atomic_write_bytes


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_gives_the_mode_of_a_plain_write(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "out.bin", b"data")
        (tmp_path / "plain.bin").write_bytes(b"data")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "out.bin").stat().st_mode)
    assert mode == 0o666 & ~umask
    assert mode == stat.S_IMODE((tmp_path / "plain.bin").stat().st_mode)
    assert (tmp_path / "out.bin").read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "plain.bin"]


def test_writing_leaves_no_temporary_folder_when_the_body_raises(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(RuntimeError, match="boom"), ws.writing("scores", {"a": 1}) as folder:
        (folder / "part.npy").write_bytes(b"half")
        raise RuntimeError("boom")
    assert list(ws.artifacts.iterdir()) == []
    assert ws.read_meta("scores") is None


def test_writing_replaces_an_older_artifact_whole(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    with ws.writing("scores", {"a": 1}) as folder:
        (folder / "old.txt").write_text("old")
    with ws.writing("scores", {"a": 2}) as folder:
        (folder / "new.txt").write_text("new")
    assert sorted(p.name for p in ws.artifact_dir("scores").iterdir()) == ["meta.json",
                                                                           "new.txt"]
    assert [p.name for p in ws.artifacts.iterdir()] == ["scores"]


def test_is_current_only_for_the_same_identity(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    identity = {"settings": {"dim": 512, "seed": 0}, "inputs": ["abc"]}
    assert not ws.is_current("scores", identity)
    with ws.writing("scores", identity):
        pass
    assert ws.is_current("scores", {"inputs": ["abc"], "settings": {"seed": 0, "dim": 512}})
    assert not ws.is_current("scores", {"settings": {"dim": 256, "seed": 0}, "inputs": ["abc"]})
    assert not ws.is_current("other", identity)


def test_clean_partial_removes_leftover_temporary_folders_only(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    with ws.writing("kept", {}):
        pass
    leftover = ws.artifacts / ".tmp-scores-abc123"
    (leftover / "sub").mkdir(parents=True)
    (leftover / "sub" / "part.npy").write_bytes(b"half")

    assert ws.clean_partial() == [leftover]
    assert [p.name for p in ws.artifacts.iterdir()] == ["kept"]
    assert ws.clean_partial() == []
