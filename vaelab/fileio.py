"""Writing files so that a crash never leaves half a file behind."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from .errors import VaelabError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write data to path via a temporary file, fsync and rename.

    A reader (or a run killed mid-write) sees the old file or the new one,
    never a mixture.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    # os.open rather than mkstemp: the file gets the usual umask permissions.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    """Write obj as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def check_output(path: str | Path, *, flag: str, suffix: str | None = None, force: bool = True) -> Path:
    """Refuse an output file that cannot or must not be written, before any work: a wrong suffix,
    a file that exists (unless force), a folder that does not exist. flag names the option."""
    path = Path(path)
    if suffix and path.suffix.lower() != suffix:
        raise VaelabError(f"{flag} must name a {suffix} file, got {path}")
    if path.exists() and not force:
        raise VaelabError(f"{path} exists; pass --force to overwrite it")
    if not path.parent.is_dir():
        raise VaelabError(f"cannot write {path}: folder {path.parent} does not exist")
    return path
