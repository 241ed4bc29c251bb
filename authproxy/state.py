"""The state dir: what must survive a restart (created tokens, refresh tokens, rotated app tokens).

Writes are atomic and durable — temp file, fsync, rename, fsync of the folder —
because some of what lives here (a rotated refresh token) is the only copy of a
credential the upstream will accept: a torn or lost write means a person has to
log in again. The state dir and every folder authproxy creates for it are 0700
(whatever the umask; parents that existed already are left as they are) and
every file 0600.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


class StateError(Exception):
    pass


DIR_MODE = 0o700
FILE_MODE = 0o600


def _ensure_dir(path: Path, root: Path | None = None) -> None:
    """Make ``path`` exist as a private folder. Every folder created on the way is
    made 0700 explicitly (``mkdir``'s mode applies to the last one only, and through
    the umask); so are ``root`` (the state dir itself, which systemd's
    StateDirectory= creates 0755) and ``path``, even when they existed already.
    Other parents that existed already (``~/.local``) are left as they are."""
    try:
        missing: list[Path] = []
        p = path
        while not p.is_dir():
            missing.append(p)
            if p.parent == p:
                break
            p = p.parent
        for d in reversed(missing):
            try:
                d.mkdir(mode=DIR_MODE)
            except FileExistsError:
                if not d.is_dir():
                    raise
                continue  # made by another process at the same moment; it sets the mode
            os.chmod(d, DIR_MODE)  # mkdir's mode went through the umask
        for d in (root, path):
            if d is not None and d.stat().st_mode & 0o777 != DIR_MODE:
                os.chmod(d, DIR_MODE)
    except OSError as e:
        raise StateError(f"cannot use the state dir {root or path}: {e.strerror or e}") from None


def write_atomic(path: Path, data: bytes, root: Path | None = None, mode: int = FILE_MODE) -> None:
    """Replace ``path`` by ``data`` so that a crash leaves either the old or the new file
    (temp file with its final ``mode``, fsync, rename, fsync of the folder)."""
    _ensure_dir(path.parent, root)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class StateDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def ensure(self) -> Path:
        """Create the state dir (0700) now rather than at the first write."""
        _ensure_dir(self.path, self.path)
        return self.path

    def service(self, name: str) -> "ServiceStore":
        return ServiceStore(self.path / name, root=self.path)


class ServiceStore:
    """One service's corner of the state dir: small JSON documents by name."""

    def __init__(self, path: Path, root: Path | None = None) -> None:
        self.path = path
        self.root = root  # the state dir itself: kept 0700 too

    def _file(self, name: str) -> Path:
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"bad state document name {name!r}")
        return self.path / f"{name}.json"

    def get(self, name: str) -> Any:
        """The stored document, or None when there is none. An unreadable document is
        an error, not an empty one: silently dropping it could lose a refresh token."""
        p = self._file(name)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"cannot read {p}: {e.strerror or e}") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise StateError(f"{p} is not valid JSON; move it away to start afresh") from None

    def put(self, name: str, doc: Any) -> None:
        try:
            write_atomic(self._file(name), json.dumps(doc, indent=1, sort_keys=True).encode(), self.root)
        except OSError as e:
            raise StateError(f"cannot write {self._file(name)}: {e.strerror or e}") from None

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._file(name).unlink()

    def mtime(self, name: str) -> float | None:
        try:
            return self._file(name).stat().st_mtime_ns / 1e9
        except OSError:
            return None

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
