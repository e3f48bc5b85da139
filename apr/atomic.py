"""Atomic outputs: write beside the target under a temporary name, fsync, rename into place.
On any error the temporary is removed, so a failed write never leaves a partial output.

The directories a write creates for its output (``-o new/dir/out.apr``) are removed again
when it fails (`_made_parents`).

Temporaries are named ``.{target}.apr-ref-{pid}-{random}.tmp``. A process killed mid-write
cannot remove its own; the next write to the same target removes every such temporary whose
process is gone (`remove_stale`)."""
from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import AprError, OutputExistsError


def check_output(path: str | os.PathLike, force: bool) -> Path:
    """Refuse to overwrite an existing output unless forced."""
    p = Path(path)
    if os.path.lexists(p) and not force:        # a dangling or looping link too
        raise OutputExistsError(f"{p} already exists (use --force to overwrite)")
    return p


TMP_TAG = "apr-ref"


def current_umask() -> int:
    """The process's umask: an output gets the mode a plain open() would give it (0666 &
    ~umask), not the temporary file's 0600. Read from /proc where it is there (os.umask can
    only be read by setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.{TMP_TAG}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True                 # someone else's live process (or not ours to judge)
    return True


def remove_stale(target: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of earlier writes to ``target`` whose process no longer runs;
    returns what was removed."""
    target = Path(target)
    return _remove_stale(target.parent, re.escape(f".{target.name}."))


def remove_stale_in(directory: str | os.PathLike) -> list[Path]:
    """`remove_stale` for every target in ``directory`` (a run's checkpoint folder)."""
    return _remove_stale(Path(directory), r"\..+\.")


def _remove_stale(directory: Path, name_pattern: str) -> list[Path]:
    pattern = re.compile(name_pattern + re.escape(f"{TMP_TAG}-") + r"(\d+)-[^/]*\.tmp")
    removed = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


_COMMIT_CHECKS: contextvars.ContextVar[tuple[Callable[[], None], ...]] = \
    contextvars.ContextVar("apr_commit_checks", default=())


@contextlib.contextmanager
def checked_before_commit(check: Callable[[], None]) -> Iterator[None]:
    """Inside this block every `atomic_file` / `atomic_dir` calls ``check()`` after its content
    is written and before it is renamed into place: a check that raises leaves no output. (A
    conversion verifies its input's checksum while it writes, and commits only if it held.)"""
    token = _COMMIT_CHECKS.set(_COMMIT_CHECKS.get() + (check,))
    try:
        yield
    finally:
        _COMMIT_CHECKS.reset(token)


def _run_commit_checks() -> None:
    for check in _COMMIT_CHECKS.get():
        check()


@contextlib.contextmanager
def _made_parents(target: Path) -> Iterator[None]:
    """Create the missing directories above ``target``; if the block fails, remove those of
    them that are still empty (innermost first), so a failed write leaves nothing behind."""
    missing = []
    parent = target.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    try:
        if missing:
            with _naming(target, None):
                target.parent.mkdir(parents=True, exist_ok=True)
        yield
    except BaseException:
        for d in missing:               # innermost first
            try:
                d.rmdir()
            except OSError:             # not empty (someone else wrote there), or gone
                break
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed to `path`."""
    target = Path(path)
    with _made_parents(target):
        with _atomic_file(target) as tmp:
            yield tmp


@contextlib.contextmanager
def _atomic_file(target: Path) -> Iterator[Path]:
    remove_stale(target)
    with _naming(target, None):
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())     # mkstemp's 0600 would survive the rename
    tmp_path = Path(tmp)
    try:
        with _naming(target, tmp_path):
            yield tmp_path
            _run_commit_checks()
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


_DISK_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EFBIG}


@contextlib.contextmanager
def _naming(target: Path, tmp: Path | None) -> Iterator[None]:
    """An OSError while writing the temporary (a read-only or full disk) names the output the
    user asked for, not the hidden temporary."""
    try:
        yield
    except OSError as e:
        where = str(getattr(e, "filename", "") or "")
        if tmp is None or where.startswith(str(tmp)) or e.errno in _DISK_ERRORS:
            raise AprError(f"{target}: cannot write: {e.strerror or e}") from None
        raise


def fsync_dir(directory: Path) -> None:
    """Make a rename durable where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` whole."""
    target = Path(path)
    with _made_parents(target):
        with _atomic_dir(target) as tmp:
            yield tmp


@contextlib.contextmanager
def _atomic_dir(target: Path) -> Iterator[Path]:
    remove_stale(target)
    with _naming(target, None):
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target), suffix=".tmp", dir=target.parent))
        os.chmod(tmp, 0o777 & ~current_umask())     # mkdtemp's 0700 likewise
    try:
        with _naming(target, tmp):
            yield tmp
            _run_commit_checks()
            for child in tmp.iterdir():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
            if target.exists():
                old = target.with_name(f".{target.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
                os.replace(tmp, target)
                if old.is_dir():
                    shutil.rmtree(old)
                else:
                    old.unlink()
            else:
                os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
