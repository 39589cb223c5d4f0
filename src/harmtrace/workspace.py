"""One investigation's folder: database, artifacts, atomic writes and stage skipping.

Layout::

    WORKSPACE/
      harmtrace.db            SQLite database (unless a database URL is given)
      artifacts/STAGE/        one folder per stage artifact, written whole or not at all
        meta.json             settings and input fingerprints that made it
        ...                   the stage's files

An artifact folder is first written under ``artifacts/.tmp-STAGE-*`` and renamed into place
when complete, so a stage killed midway leaves no half-written artifact; the next run starts
that stage again. A stage whose ``meta.json`` matches the new settings and inputs is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harmtrace._logging import get_logger
from harmtrace.errors import ArtifactError
from harmtrace.hashing import canonical_json, sha256_json

__all__ = ["Workspace", "atomic_write_bytes", "atomic_write_text", "atomic_write_json"]

log = get_logger(__name__)


def _umask() -> int:
    """The process umask, read without changing it where the platform allows."""
    try:  # Linux: setting and restoring os.umask would race with other threads
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename.

    The finished file gets the mode a plain ``open(path, "w")`` would give it
    (``0o666`` less the umask), not the private ``0o600`` of the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@dataclass(frozen=True)
class Workspace:
    """A folder holding one investigation.

    Parameters
    ----------
    root:
        The workspace folder; created when missing.
    database_url:
        SQLAlchemy URL of the database; ``None`` means ``sqlite:///ROOT/harmtrace.db``.
    """

    root: Path
    database_url: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())
        self.root.mkdir(parents=True, exist_ok=True)
        self.artifacts.mkdir(exist_ok=True)

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.root / 'harmtrace.db'}"

    def artifact_dir(self, name: str) -> Path:
        """Folder of the finished artifact ``name`` (it may not exist yet)."""
        return self.artifacts / name

    def read_meta(self, name: str) -> dict[str, Any] | None:
        """The ``meta.json`` of a finished artifact, or ``None`` when there is none."""
        meta = self.artifact_dir(name) / "meta.json"
        if not meta.exists():
            return None
        return json.loads(meta.read_text(encoding="utf-8"))

    def require(self, name: str, *, stage_hint: str) -> Path:
        """The folder of a finished artifact; an :class:`ArtifactError` if it is missing."""
        folder = self.artifact_dir(name)
        if not (folder / "meta.json").exists():
            raise ArtifactError(
                f"artifact '{name}' is missing from {self.artifacts}; "
                f"run `harmtrace {stage_hint}` first"
            )
        return folder

    def is_current(self, name: str, identity: dict[str, Any]) -> bool:
        """Whether artifact ``name`` exists and was made from exactly ``identity``."""
        meta = self.read_meta(name)
        if meta is None:
            return False
        return meta.get("identity_digest") == sha256_json(identity)

    @contextmanager
    def writing(self, name: str, identity: dict[str, Any]) -> Iterator[Path]:
        """Write artifact ``name`` into a temporary folder, then move it into place.

        ``identity`` (settings plus input fingerprints) is stored in ``meta.json``; the
        artifact counts as current for later runs only if that identity is the same.
        """
        final = self.artifact_dir(name)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.artifacts, prefix=f".tmp-{name.replace('/', '_')}-"))
        try:
            yield tmp
            meta = {"identity": json.loads(canonical_json(identity)),
                    "identity_digest": sha256_json(identity)}
            atomic_write_json(tmp / "meta.json", meta)
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes a private folder
            if final.exists():
                trash = final.with_name(f".old-{final.name}")
                shutil.rmtree(trash, ignore_errors=True)
                os.replace(final, trash)
                os.replace(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, final)
            log.info("wrote artifact %s", final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def clean_partial(self) -> list[Path]:
        """Remove temporary folders left by a stage that was killed; returns what was removed."""
        removed = []
        for tmp in self.artifacts.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
        return removed
