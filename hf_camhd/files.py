"""Files the tools persist: atomic writes, leftovers of interrupted writes, and reads that fail with one clear error.

Everything ``hf-camhd compare``, the training scripts and :mod:`hf_camhd.hub` write goes through here:

* :func:`atomic_write` / :func:`atomic_write_json` / :func:`atomic_path` write a temporary file in the same
  folder and ``os.replace`` it onto the target, so a reader (or the next start after a ``SIGKILL``) sees the
  old version or the new one, never half of one;
* :func:`atomic_dir` / :func:`commit_dir` do the same for a whole folder (a checkpoint, a Hub folder);
* :func:`recover_leftovers` finds what an interrupted write left behind (temporary files and folders are
  removed; a folder moved aside by an interrupted :func:`commit_dir` is put back) and says what it did;
* :func:`read_json` and :func:`check_files` turn a truncated or corrupted file into one
  :class:`CorruptFileError` that names the file and what to do, instead of a traceback from inside
  ``json``, ``zipfile`` or ``torch``.

Temporary names start with a dot and carry ``.partial`` (or ``.replaced-`` for a folder moved aside), so
they never look like results, checkpoints or Hub files.

Example:
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> from hf_camhd.files import atomic_write_json, read_json
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = atomic_write_json(folder / "results.json", {"accuracy": 0.9})
    >>> read_json(folder / "results.json", fix="delete it")
    {'accuracy': 0.9}
    >>> sorted(p.name for p in folder.iterdir())      # no temporary file is left behind
    ['results.json']
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "CorruptFileError",
    "atomic_dir",
    "atomic_path",
    "atomic_write",
    "atomic_write_json",
    "check_file",
    "check_files",
    "commit_dir",
    "is_leftover",
    "partial_path",
    "read_json",
    "recover_leftovers",
    "scratch_dir",
]

_PARTIAL = ".partial"
_REPLACED = ".replaced-"


class CorruptFileError(ValueError):
    """A file the tools wrote earlier cannot be read back (truncated, corrupted, or not what it should be).

    The message names the file and what to do (delete it, or start over)."""


# ------------------------------------------------------------------------------------------------ names
def partial_path(path: str | os.PathLike, token: str = "") -> Path:
    """The temporary sibling of ``path`` a writer fills before renaming it onto ``path``:
    ``<folder>/.<name>.partial[-<token>]<suffix>`` (the suffix is kept: matplotlib and safetensors read it).

    Without ``token`` the name is deterministic, so several processes can agree on one temporary folder."""
    path = Path(path)
    tail = f"-{token}" if token else ""
    return path.with_name(f".{path.name}{_PARTIAL}{tail}{path.suffix}")


def is_leftover(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a temporary file / folder of an interrupted atomic write (see :func:`partial_path`)."""
    name = Path(path).name
    return name.startswith(".") and (_PARTIAL in name or _REPLACED in name)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------ files
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an exception the file written
    there replaces ``path`` in one ``os.replace``. On an exception the temporary file is removed and
    ``path`` is left as it was.

    For writers that take a path (``fig.savefig``, ``safetensors.torch.save_file``, ``torch.save``)::

        with atomic_path(out / "learning_curves.png") as tmp:
            fig.savefig(tmp, dpi=110)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path, uuid.uuid4().hex[:8])
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically; returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1, **dumps_kwargs) -> Path:
    """``json.dumps(obj)`` written to ``path`` atomically (with a trailing newline); returns ``path``."""
    return atomic_write(path, json.dumps(obj, indent=indent, **dumps_kwargs) + "\n")


# ------------------------------------------------------------------------------------------------ folders
def commit_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Make the finished folder ``tmp`` become ``path``.

    A new ``path`` is one ``os.replace``. An existing one is first moved aside (``.<name>.replaced-<id>``),
    then ``tmp`` takes its place and the old folder is deleted; a kill between the two renames leaves the
    old folder aside, and :func:`recover_leftovers` puts it back."""
    tmp, path = Path(tmp), Path(path)
    if not path.exists():
        os.replace(tmp, path)
        return path
    aside = path.with_name(f".{path.name}{_REPLACED}{uuid.uuid4().hex[:8]}")
    os.replace(path, aside)
    os.replace(tmp, path)
    shutil.rmtree(aside, ignore_errors=True)
    return path


@contextlib.contextmanager
def scratch_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh, empty temporary folder beside ``path`` (same file system, so its files can be renamed
    into place); it is removed when the block ends, whatever happens."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path, uuid.uuid4().hex[:8])
    tmp.mkdir()
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; when the block ends without an exception it
    becomes ``path`` (:func:`commit_dir`). On an exception it is removed and ``path`` is left as it was.

    One process only; several processes writing one folder agree on ``partial_path(path)`` and call
    :func:`commit_dir` from one of them after a barrier."""
    with scratch_dir(path) as tmp:
        yield tmp
        commit_dir(tmp, path)


def recover_leftovers(folder: str | os.PathLike, *, log: Callable[[str], None] | None = None) -> list[str]:
    """Clean up after atomic writes into ``folder`` that a kill interrupted (not recursive).

    Temporary files and folders (``.<name>.partial…``) are deleted: their write never finished, and the
    target still holds its previous version. A folder moved aside by an interrupted :func:`commit_dir`
    (``.<name>.replaced-…``) is put back when ``<name>`` is missing, else deleted. Returns one sentence
    per action (also passed to ``log``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    done = []
    for entry in sorted(folder.iterdir()):
        if not is_leftover(entry):
            continue
        if _REPLACED in entry.name:
            target = folder / entry.name[1:].split(_REPLACED)[0]
            if not target.exists():
                os.replace(entry, target)
                done.append(f"restored {target} (a replacement of it was interrupted)")
                continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        done.append(f"removed {entry} (left by an interrupted write)")
    for line in done:
        if log is not None:
            log(line)
    return done


# ------------------------------------------------------------------------------------------------ reading
def read_json(path: str | os.PathLike, *, fix: str, what: str = "") -> Any:
    """The parsed JSON file at ``path``; a file that is not valid JSON raises :class:`CorruptFileError`
    naming the file, where parsing stopped, and ``fix`` (what the user should do)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text)
    except (UnicodeDecodeError, ValueError) as err:
        size = path.stat().st_size
        raise CorruptFileError(f"{what or 'File'} {str(path)!r} is truncated or corrupted ({size} bytes; not valid "
                               f"JSON: {err}). {fix}") from None
    except IsADirectoryError:
        raise CorruptFileError(f"{what or 'File'} {str(path)!r} is a folder, not a JSON file. {fix}") from None


def _check_zip(path: Path) -> str | None:
    """``None`` when the torch.save / zip archive at ``path`` is whole, else why not."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"not a complete torch.save archive: {err}"
    return None if bad is None else f"member {bad!r} fails its checksum"


def _check_safetensors(path: Path) -> str | None:
    """``None`` when the safetensors file at ``path`` holds every byte its header declares, else why not."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"header declares {n} bytes but the file has {size}"
        try:
            header = json.loads(f.read(n))
        except ValueError as err:
            return f"unreadable header ({err})"
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"header declares {8 + n + end} bytes but the file has {size} (truncated)"
    return None


def _check_one(path: Path) -> str | None:
    if path.stat().st_size == 0:
        return "empty (0 bytes)"
    if path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            return f"not valid JSON: {err}"
        return None
    if path.suffix == ".safetensors":
        return _check_safetensors(path)
    if path.suffix in (".pt", ".pth", ".bin", ".pkl"):
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic[:2] == b"PK":  # torch.save's zip format; older pickle-only files are not checked
            return _check_zip(path)
    return None


def check_file(path: str | os.PathLike, *, fix: str, what: str = "File") -> Path:
    """Check one file as :func:`check_files` does; a missing, truncated or corrupted file raises
    :class:`CorruptFileError` naming it and ``fix``. Returns ``path``."""
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(f"{what} {str(path)!r} is missing. {fix}")
    reason = _check_one(path)
    if reason is not None:
        raise CorruptFileError(f"{what} {str(path)!r} is truncated or corrupted ({reason}). {fix}")
    return path


def check_files(folder: str | os.PathLike, *, required: tuple[str, ...] = (), fix: str, what: str = "Checkpoint"
                ) -> Path:
    """Check that every file a checkpoint folder needs is there and whole, before anything loads it.

    ``required`` names files (glob patterns) that must exist. JSON files must parse, safetensors files
    must hold every byte their header declares, ``torch.save`` archives (``.pt``, ``.pth``, ``.bin``,
    ``.pkl``) must pass their zip checksums. The first problem raises :class:`CorruptFileError` naming
    the file and ``fix``. Returns ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CorruptFileError(f"{what} {str(folder)!r} is not a folder. {fix}")
    for pattern in required:
        if not any(folder.glob(pattern)):
            raise CorruptFileError(f"{what} {str(folder)!r} is incomplete: {pattern} is missing (was the run killed "
                                   f"while saving it?). {fix}")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        check_file(path, fix=fix, what=f"{what} file")
    return folder
