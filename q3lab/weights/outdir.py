"""Where q3lab writes: output folders it claimed, and single output files it may replace.

Nothing the user made is overwritten or deleted:

- An output folder (`q3lab synth`) is written only when it is new or empty, or when it holds our marker
  `.q3lab-output.json` naming the same tool. The marker records every file the tool wrote with its size and
  mtime_ns, so a file changed since (trained weights copied over, an edited config) or added by someone else
  is not ours, and the tool refuses to replace it. `q3lab extract` has the same rule through its journal and
  manifest (q3lab/weights/extraction.py).
- A single output file (`trace --out`, `audit --csv`) replaces an existing file only when its content says it
  is one of ours (a trace, an audit table): `is_ours` decides from the content, never from the name alone.
- Every file is written by `q3lab.weights.store.write_atomic` (temporary file, fsync, rename, fsync of the folder),
  so an interrupted or failed write leaves the old file as it was; no folder between the output folder and
  the file may be a symlink, and temporary files are created with O_EXCL|O_NOFOLLOW.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Callable, Iterable

from q3lab.errors import InputError
from q3lab.weights.store import FileDigest, fsync_dir, no_symlink_below, tmp_path, write_atomic

MARKER = ".q3lab-output.json"
FORMAT = "q3lab-output"
_MAX_MARKER = 16 << 20


class OutputError(InputError):
    """An output folder or file q3lab refuses to write: someone else's, a symlink, not a folder, unwritable."""


def _os_error(path: Path, e: OSError) -> OutputError:
    return OutputError(f"{e.filename or path}: {e.strerror or e}")


def make_parent(path: Path) -> None:
    """Create the folders above `path`; a regular file or an unwritable folder in the way is an OutputError."""
    parent = path.parent
    for p in (parent, *parent.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise OutputError(f"{path}: {p} is not a folder")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _os_error(parent, e) from None


def _identity(st: os.stat_result) -> list[int]:
    # size and mtime_ns, not the inode: a copy made with `cp -a` of a folder we wrote is still ours
    return [st.st_size, st.st_mtime_ns]


class OutputDir:
    """A folder claimed by one q3lab tool (see the module doc): `claim`, then `write` / `keep` / `remove`."""

    def __init__(self, path: Path, tool: str, data: dict[str, Any]):
        self.path, self.tool, self.data = path, tool, data

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.data["files"]

    @classmethod
    def claim(cls, path: str | Path, tool: str) -> "OutputDir":
        """Make `path` the output folder of `tool`: create it, or take it when empty or when it holds our
        marker for `tool`; anything else is an OutputError naming the folder and a few of its entries."""
        path = Path(path)
        if (path.exists() or path.is_symlink()) and not path.is_dir():
            raise OutputError(f"{path}: exists and is not a folder")
        try:
            path.mkdir(parents=True, exist_ok=True)
            entries = sorted(p.name for p in path.iterdir())
        except OSError as e:
            raise _os_error(path, e) from None
        marker = path / MARKER
        if MARKER in entries:
            data = cls._read_marker(marker, tool)
        elif entries:
            raise OutputError(f"{path}: not empty and not made by q3lab {tool} (found {', '.join(entries[:8])}"
                              f"{' ...' if len(entries) > 8 else ''}): q3lab {tool} writes only into a new or "
                              f"empty folder, or one it made; choose another folder")
        else:
            data = {"format": FORMAT, "tool": tool, "files": {}}
        d = cls(path, tool, data)
        d._save()
        for rel, rec in d.files.items():   # partial files of an interrupted write (ours: we marked it pending)
            if rec.get("pending"):
                tmp_path(path / rel).unlink(missing_ok=True)
        return d

    @staticmethod
    def _read_marker(marker: Path, tool: str) -> dict[str, Any]:
        try:
            st = os.lstat(marker)
            if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_MARKER:
                raise OutputError(f"{marker}: not a q3lab output marker (not a regular file, or too large)")
            data = json.loads(marker.read_bytes().decode("utf-8"))
        except OSError as e:
            raise _os_error(marker, e) from None
        except (ValueError, RecursionError) as e:
            raise OutputError(f"{marker}: unreadable q3lab output marker ({str(e)[:100]}); remove the folder "
                              f"to start over") from None
        files = data.get("files") if isinstance(data, dict) else None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(files, dict) or \
                not all(isinstance(r, dict) for r in files.values()):
            raise OutputError(f"{marker}: not a q3lab output marker; remove the folder to start over")
        if data.get("tool") != tool:
            raise OutputError(f"{marker.parent}: made by q3lab {data.get('tool')}, not q3lab {tool}; choose "
                              f"another folder")
        return data

    def _save(self) -> None:
        write_atomic(self.path / MARKER, json.dumps(self.data, sort_keys=True).encode(), root=self.path,
                     error=OutputError)

    # -- which files are ours ---------------------------------------------------------------------
    def ours(self, rel: str) -> bool:
        """Is `rel` a regular file this tool wrote and nobody changed since (or one it was writing when it
        was interrupted)?"""
        rec = self.files.get(rel)
        if rec is None:
            return False
        try:
            st = os.lstat(self.path / rel)
        except FileNotFoundError:
            return False
        return stat.S_ISREG(st.st_mode) and (bool(rec.get("pending")) or _identity(st) in rec.get("ids", []))

    def foreign(self) -> list[str]:
        """Everything under the folder that is not ours (relative paths, sorted): files we did not write or
        that changed since, symlinks, special files. Links are not followed."""
        found = []
        for top, dirs, names in os.walk(self.path, followlinks=False):
            for name in dirs + names:
                p = Path(top) / name
                rel = p.relative_to(self.path).as_posix()
                if rel == MARKER or (p.is_dir() and not p.is_symlink()):
                    continue
                if rel.endswith(".tmp") and self.files.get(rel[:-4], {}).get("pending"):
                    continue
                if not self.ours(rel):
                    found.append(rel)
        return sorted(found)

    # -- writing ----------------------------------------------------------------------------------
    def _check_replaceable(self, rel: str) -> Path:
        p = self.path / rel
        if (p.exists() or p.is_symlink()) and not self.ours(rel):
            raise OutputError(f"{p}: exists and was not written by q3lab {self.tool} (or changed since): "
                              f"refusing to replace it")
        no_symlink_below(self.path, p, OutputError)
        return p

    def write(self, rel: str, data: bytes | Path | Callable[[Any], None]) -> FileDigest:
        """Write `rel` atomically (see `q3lab.weights.store.write_atomic` for `data`), recording it as ours."""
        p = self._check_replaceable(rel)
        self.files[rel] = {**self.files.get(rel, {}), "pending": True}
        self._save()
        digest = write_atomic(p, data, root=self.path, error=OutputError)
        self.keep(rel)
        return digest

    def keep(self, rel: str) -> None:
        """Record `rel` as it is now (a file of ours left complete by an earlier run)."""
        try:
            st = os.lstat(self.path / rel)
        except OSError as e:
            raise _os_error(self.path / rel, e) from None
        self.files[rel] = {"ids": [_identity(st)]}
        self._save()

    def remove(self, rel: str) -> None:
        """Delete `rel` if it exists (only ever a file of ours)."""
        p = self._check_replaceable(rel)
        try:
            p.unlink(missing_ok=True)
            fsync_dir(p.parent)
        except OSError as e:
            raise _os_error(p, e) from None
        self.files.pop(rel, None)
        self._save()


# -- single output files -----------------------------------------------------------------------------
def write_file(path: str | Path, data: bytes | Callable[[Any], None], *, what: str,
               is_ours: Callable[[Path], bool]) -> Path:
    """Write one output file atomically. An existing file is replaced only when `is_ours(path)` says from
    its content that it is a q3lab `what` (a trace, an audit table); a symlink, a folder or anyone else's file
    at `path` is an OutputError, and so is a failed write, which leaves the old file as it was."""
    path = Path(path)
    make_parent(path)
    if path.is_symlink():
        raise OutputError(f"{path}: is a symlink; q3lab does not write through it (give the real path)")
    if path.exists():
        if path.is_dir():
            raise OutputError(f"{path}: is a folder, expected a file name")
        if not path.is_file():
            raise OutputError(f"{path}: not a regular file")
        if not is_ours(path):
            raise OutputError(f"{path}: exists and is not a q3lab {what}: refusing to replace it (choose another "
                              f"name or remove it)")
    write_atomic(path, data, error=OutputError)
    return path


def first_line(path: Path, limit: int = 1 << 16) -> str:
    """The first line of a text file (at most `limit` bytes; '' when unreadable)."""
    try:
        with open(path, "rb") as f:
            return f.readline(limit).decode("utf-8", "replace").rstrip("\r\n")
    except OSError:
        return ""


def csv_with_header(columns: Iterable[Iterable[str]]) -> Callable[[Path], bool]:
    """An `is_ours` for CSV tables: the file's first line is exactly one of these column headers."""
    headers = {",".join(c) for c in columns}
    return lambda path: first_line(path) in headers


def check_writable_name(path: str | Path) -> None:
    """Fail early (before hours of work) where `write_file(path)` would be refused for the place itself."""
    path = Path(path)
    for p in (path.parent, *path.parent.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise OutputError(f"{path}: {p} is not a folder")
            break
    if path.is_symlink() or path.is_dir():
        raise OutputError(f"{path}: is a {'symlink' if path.is_symlink() else 'folder'}, expected a file name")


__all__ = ["MARKER", "OutputDir", "OutputError", "write_file", "csv_with_header", "first_line", "make_parent",
           "check_writable_name"]
