"""Crash-safe saving: a folder is replaced by a complete new one, never left half-written or missing.

A save writes every file into a staging folder and syncs it, then *commits* by renaming it to
``.NAME.new``; only then is the old folder moved aside to ``.NAME.old`` and the new one moved in.
A kill can stop a save between any two filesystem operations; `recover` (run by every save and
every reader first) turns whatever it left into the newest committed folder:

==========================  =====================================  ==============================
left on disk                what happened                          `recover`
==========================  =====================================  ==============================
``.NAME.tmp-*``             a save that never committed            deleted (folder or file)
``.NAME.new``               committed, not yet moved in            NAME aside, ``.new`` -> NAME
``.NAME.old`` beside NAME   moved in, old copy not yet deleted     deleted
==========================  =====================================  ==============================

Folders and files are created with the process's umask (no owner-only temporary modes). Every
filesystem operation goes through the small functions below, so a test can fail each in turn.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


# ------------------------------------------------------------------ the filesystem operations of a save
def _make_dir(path: Path) -> None:
    os.mkdir(path)  # mode 0o777 & ~umask, unlike tempfile.mkdtemp's 0o700


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target, copy_function=_link_or_copy)
    else:
        _link_or_copy(source, target)


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    try:
        os.link(source, target)  # instant, and the old folder's copy stays intact until it is deleted
    except OSError:
        shutil.copy2(source, target)


def _rename(source: Path, target: Path) -> None:
    os.rename(source, target)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


# ------------------------------------------------------------------ saving and recovering
def _siblings(final: Path) -> tuple[Path, Path]:
    return final.with_name(f".{final.name}.new"), final.with_name(f".{final.name}.old")


@contextlib.contextmanager
def _locked(parent: Path) -> Iterator[None]:
    """Serialise saves and recoveries of folders in `parent` across threads and processes."""
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _recover_locked(final: Path) -> None:
    new, old = _siblings(final)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        _remove_tree(stale)
    if new.exists():
        if old.exists():
            _remove_tree(old)
        if final.exists():
            _rename(final, old)
        _rename(new, final)
        _sync_dir(final.parent)
    elif old.exists() and not final.exists():  # only reachable by hand; the old copy is all there is
        _rename(old, final)
    if old.exists():
        _remove_tree(old)


def recover(final: str | Path) -> None:
    """Finish or undo whatever an interrupted save of `final` left (see the module docstring)."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    new, old = _siblings(final)
    if not (new.exists() or old.exists() or any(final.parent.glob(f".{final.name}.tmp-*"))):
        return  # the usual case: nothing to do, and nothing written (read-only folders stay readable)
    with _locked(final.parent):
        _recover_locked(final)


def save_directory(final: str | Path, files: dict[str, bytes], *, keep_other_files: bool = False) -> Path:
    """Replace the folder `final` by one holding `files` (name -> contents), crash-safely.

    With `keep_other_files`, whatever else the old folder held (a README, logs) is carried over.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    new, old = _siblings(final)
    with _locked(final.parent):
        _recover_locked(final)
        staging = final.with_name(f".{final.name}.tmp-{secrets.token_hex(4)}")
        try:
            _make_dir(staging)
            for name, data in files.items():
                _write_file(staging / name, data)
            if keep_other_files and final.is_dir():
                for entry in sorted(final.iterdir()):
                    if entry.name not in files:
                        _copy(entry, staging / entry.name)
            _sync_dir(staging)
            _rename(staging, new)  # the commit point: from here on the new folder is what recovery keeps
        except BaseException:
            with contextlib.suppress(OSError):
                _remove_tree(staging)
            raise
        if final.exists():
            _rename(final, old)
        _rename(new, final)
        _sync_dir(final.parent)
        if old.exists():
            _remove_tree(old)
    return final


def write_file(path: str | Path, data: bytes | str) -> Path:
    """Replace one file crash-safely: written beside it under a temporary name, synced, renamed over it."""
    path = Path(path)
    data = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        _write_file(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def write_figure(path: str | Path, fig: Figure, dpi: int = 120) -> Path:
    """A matplotlib figure as a PNG, replaced like `write_file` (never half a picture); the figure is closed."""
    import matplotlib.pyplot as plt  # here, not at the top: the core engine does not need matplotlib

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return write_file(path, buffer.getvalue())
