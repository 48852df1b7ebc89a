"""Atomic file and folder writes: a failure leaves the old content or nothing, never a half-written file.

New content goes to a hidden temporary name beside the target (`.<name>.<pid>.<random>.tmp`), is flushed to disk
(every file, then its folder), and then takes the target's place in one rename, after which the parent folder is
flushed too (POSIX; skipped where the system cannot fsync folders). So an exception, a power cut or a hard kill
leaves either the old or the new content. A hard kill can leave the temporary itself behind; the next write of the
same target removes such leftovers of writes that are no longer running.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def _fsync_path(path: Path, directory: bool = False) -> None:
    """Flush a file's (or a folder's entries') data to disk. Folders cannot be opened or synced everywhere
    (Windows): skipped there."""
    if directory and os.name != "posix":
        return
    flags = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if directory else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every folder (deepest first), so their entries are durable too."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            file = Path(folder) / name
            if not file.is_symlink():
                _fsync_path(file)
        _fsync_path(Path(folder), directory=True)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


# what follows `.<name>.` in our temporaries: the writer's pid (absent in older versions) and tempfile's 8 characters
_TEMP_MIDDLE = re.compile(r"(?:(\d+)\.)?[a-z0-9_]{8}")


#: temporaries this process is writing now; one of its pid that is not here is a leftover (pids repeat in containers)
_LIVE: set[str] = set()


def _pid_running(pid: int) -> bool:
    if os.name != "posix":
        return False  # no cheap, safe liveness check (os.kill(pid, 0) signals on Windows): treat as stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries (`.<name>.<pid>.*.tmp`) that hard-killed writes of `path` left beside it: those of
    processes no longer running (or of this process's pid that it is not writing: pids repeat across container
    restarts), and old-style ones without a pid. Returns what was removed."""
    path = Path(path)
    removed = []
    for entry in sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp")):
        match = _TEMP_MIDDLE.fullmatch(entry.name[len(path.name) + 2 : -len(".tmp")])
        if match is None or str(entry) in _LIVE:
            continue  # another target's temporary, or one this process is writing
        pid = match.group(1)
        if pid is not None and int(pid) != os.getpid() and _pid_running(int(pid)):
            continue  # another running process is writing it
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator:
    """Open a temporary file beside `path`; on success it replaces `path` in one rename (flushed to disk first,
    the folder after). Leftover temporaries of hard-killed earlier writes of `path` are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    _LIVE.add(tmp)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        _LIVE.discard(tmp)
    _fsync_path(path.parent, directory=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, merge: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it takes the place of `path`.

    The new content is written and flushed to disk (every file and folder) before anything of `path` changes. An
    existing `path` is then replaced as a whole: files in the old folder that the new one does not write are dropped,
    like a fresh `save_pretrained`. Callers decide whether that may happen (`save_sparse` checks the folder first).

    With `merge`, an existing `path` is kept and the new files are moved into it one by one instead (each rename is
    atomic, the set is not: a hard kill in the middle leaves a mix of old and new files); old entries for which
    `merge(name)` is true and that the new content lacks are removed; every other entry is left as it is.

    Leftover temporaries of hard-killed earlier writes of `path` are removed first (`remove_stale_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    _LIVE.add(str(tmp))
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _LIVE.discard(str(tmp))
        raise
    try:
        if merge is not None and path.is_dir():
            _merge_into(tmp, path, merge)
        else:
            _swap(tmp, path)
    finally:
        _LIVE.discard(str(tmp))


def _swap(tmp: Path, path: Path) -> None:
    old = None
    if path.exists():
        # the same temporary pattern: if a hard kill strikes between the two renames, the next write cleans it up
        old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
        os.rmdir(old)
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_path(path.parent, directory=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _merge_into(tmp: Path, path: Path, stale: Callable[[str], bool]) -> None:
    new = set(os.listdir(tmp))
    try:
        for name in sorted(new):
            target = path / name
            if target.is_dir() and not target.is_symlink() and (tmp / name).is_dir():
                shutil.rmtree(target)  # os.replace cannot put a folder over a non-empty one
            os.replace(tmp / name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name in sorted(set(os.listdir(path)) - new):
        if stale(name) and (path / name).is_file():
            (path / name).unlink()
    _fsync_path(path, directory=True)


def save_safetensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """`safetensors.torch.save_file` to a temporary name beside `path`, flushed to disk, then one rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    _LIVE.add(tmp)
    try:
        save_file(tensors, tmp, metadata=metadata)
        _fsync_path(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        _LIVE.discard(tmp)
    _fsync_path(path.parent, directory=True)
    return path
