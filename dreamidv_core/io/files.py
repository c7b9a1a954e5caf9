"""Writing files safely: folders that can hold them, atomic writes with the user's normal permissions, and
the cleaning of partial files an interrupted run left behind.

* :func:`ensure_folder` / :func:`check_output_file`: a clear :class:`~dreamidv_core.errors.InputError` (which
  path, what is wrong, what to do) when a folder cannot be made or an output cannot be written -- checked
  before any long computation, instead of a raw ``FileExistsError`` at the end of it.
* :class:`AtomicFile` / :func:`atomic_write`: the file is written beside its target under a hidden partial
  name, ``.<name>.<host>-<pid>-<random>.partial``, then renamed over the target in one step, so a crash
  never leaves a half-written file and never touches the previous one. The result gets the mode any other
  program would give it (``0o666`` minus the umask), not the ``0o600`` of ``mkstemp`` or of the
  safetensors writer.
* :func:`clean_stale_partials`: before writing ``NAME``, partial files of ``NAME`` (our naming only) whose
  writer is gone -- a process of this host that no longer runs, or anything untouched for a day -- are
  removed, and a log line says so.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, List

from ..errors import InputError

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
STALE_AFTER_S = 24 * 3600  # a partial file nobody touched for this long is abandoned, whoever wrote it
_NAME_CHARS = 160  # longest part of a target's name kept in its partial's name (file names end at 255 bytes)
_umask_lock = threading.Lock()


# ------------------------------------------------------------------------------------------------ modes
def current_umask() -> int:
    """The process umask, read without changing it where the system allows (Linux), else set and restored."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode a new file gets from ``open(path, "w")``: 0o666 without the umask bits."""
    return 0o666 & ~current_umask()


def set_default_mode(path) -> None:
    """Give a file written by a tool that makes private files (mkstemp, safetensors) the normal mode."""
    os.chmod(path, default_file_mode())


# ------------------------------------------------------------------------------------------------ paths
def _first_existing(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if os.path.lexists(parent):
            return parent
    return Path(path.anchor or ".")


def ensure_folder(folder, what: str = "folder", create: bool = True) -> Path:
    """``folder`` as an existing (``create``: made if missing) writable folder, or an :class:`InputError`
    naming ``what``, the path and the part of it that is in the way."""
    folder = Path(folder)
    base = _first_existing(folder)
    if not base.is_dir():
        where = "" if base == folder else f" (so the folder '{folder}' cannot be made)"
        raise InputError(f"{what}: '{base}' is a file, not a folder{where}; choose another place, or move the file "
                         "away")
    if not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"{what}: the folder '{base}' is not writable by this user; choose a folder you can write to")
    if create and base != folder:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{what}: cannot create the folder '{folder}' ({exc.strerror or exc})") from None
    return folder


def check_output_file(path, what: str = "output") -> Path:
    """Check that ``path`` can be written (its folder exists or can be made and is writable; ``path`` is not a
    folder) -- before the work that produces it. Creates missing parent folders."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} '{path}' is an existing folder; give a file name (e.g. '{path / 'swapped.mp4'}')")
    if not path.name:
        raise InputError(f"{what}: '{path}' has no file name")
    ensure_folder(path.parent, f"{what} '{path}'")
    return path


# ------------------------------------------------------------------------------------------------ partials
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"


def _partial_prefix(target: Path) -> str:
    return f".{target.name[:_NAME_CHARS]}."


_OWNER = re.compile(r"^(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or we cannot tell: keep the file
    return True


def _abandoned(entry: Path, middle: str, now: float) -> bool:
    try:
        age = now - entry.stat().st_mtime
    except OSError:
        return False
    owner = _OWNER.match(middle)
    if owner and owner["host"] == _host() and int(owner["pid"]) != os.getpid():
        return not _pid_running(int(owner["pid"]))
    return age > STALE_AFTER_S  # another host's, or an older naming without the owner: only when long untouched


def clean_stale_partials(target) -> List[Path]:
    """Remove the abandoned partial files of ``target`` (``.<name>.<...>.partial`` beside it, as written by
    :class:`AtomicFile` and earlier versions of this pack); returns the removed paths and logs them."""
    target = Path(target)
    prefix = _partial_prefix(target)
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return []
    now, removed = time.time(), []
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(PARTIAL_SUFFIX)) or len(name) <= len(prefix) + len(PARTIAL_SUFFIX):
            continue
        middle = name[len(prefix):-len(PARTIAL_SUFFIX)]
        if "." in middle or not entry.is_file(follow_symlinks=False):
            continue  # another target's partial (".a.mp4.x.partial" vs ".a.mp4.x.y.partial") or not a file
        path = Path(entry.path)
        if _abandoned(path, middle, now):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                continue
    if removed:
        log.warning("DreamID-V: removed %d partial file(s) of %s left by an interrupted run: %s", len(removed),
                    target.name, ", ".join(p.name for p in removed))
    return removed


class AtomicFile:
    """``with AtomicFile(path) as tmp: <write the file at tmp>``: on success the file is synced, given the
    default mode and renamed over ``path``; on any error it is removed and ``path`` is left as it was.
    ``commit()`` / ``discard()`` do the same by hand (for writers whose life spans several calls)."""

    def __init__(self, path, what: str = "output"):
        self.path = Path(path)
        ensure_folder(self.path.parent, f"{what} '{self.path}'")
        clean_stale_partials(self.path)
        fd, tmp = tempfile.mkstemp(prefix=f"{_partial_prefix(self.path)}{_host()}-{os.getpid()}-",
                                   suffix=PARTIAL_SUFFIX, dir=str(self.path.parent))
        os.close(fd)
        self.tmp = Path(tmp)

    def commit(self) -> Path:
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        set_default_mode(self.tmp)
        os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
                return
            except BaseException:
                self.discard()
                raise
        self.discard()


def atomic_write(path, write_fn: Callable[[str], None], what: str = "output") -> None:
    """Call ``write_fn(tmp_path)`` then move the result over ``path`` in one rename (see :class:`AtomicFile`).

    A crash or error at any point leaves the previous ``path`` (if any) untouched, and no partial file.
    """
    with AtomicFile(path, what) as tmp:
        write_fn(str(tmp))
