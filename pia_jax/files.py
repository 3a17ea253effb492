"""Where a run reads and writes: local paths or object-store URLs (gs://, s3://) through `etils.epath`, written
complete or not at all.

Local disks: the content is written into a hidden temporary sibling and renamed into place (an atomic step), so a
failure or a kill never leaves a half-written file or folder, and an existing one is replaced only by a complete one.
Object stores have no atomic rename. A file is written locally and uploaded as one object, which appears only
once its upload completes. A folder is uploaded file by file with its completion mark (a file the reader requires,
e.g. a model directory's config.json) last; a replaced folder loses its mark first, so a reader never takes a
mixture of old and new for complete.

The temporary siblings are named `.{name}.{pid}-{random}.tmp`; those of killed processes are removed by the next
write to the same path (`clean_stale`).
"""

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from etils import epath


def as_path(path) -> epath.Path:
    return path if isinstance(path, epath.Path) else epath.Path(path)


def is_local(path) -> bool:
    return "://" not in os.fspath(path)


def path(p):
    """A local `Path`, or an `epath.Path` for an object-store URL (a `Path` would collapse gs://b to a local gs:/b)."""
    return Path(p) if is_local(p) else as_path(p)


def nearest_existing(p: Path) -> Path:
    """`p` or its innermost ancestor that exists (what a write would create folders in)."""
    p = Path(os.path.abspath(p))
    return next(q for q in (p, *p.parents) if q.exists() or q.is_symlink())


def temp_sibling(path: Path) -> Path:
    """A hidden, unique name in the same folder, so that the final rename cannot cross file systems."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale(path, log=None) -> list[Path]:
    """Removes the temporary siblings of `path` left by killed processes of this machine (those whose process is
    gone); `log` (if given) gets one line per removal. Returns what was removed."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp") if path.parent.is_dir() else ():
        pid = tmp.name[len(path.name) + 2:].partition("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
            removed.append(tmp)
            if log:
                log(f"removed {tmp}, left by an interrupted write (process {pid})")
    return removed


def _remove(path: Path):
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(path, *, directory: bool = False, force: bool = True, mark: str | None = None, log=None):
    """Yields a local temporary path (a file name, or an empty folder if `directory`) to write; once the block
    completes its content replaces `path` as the module docstring says. On any failure or interrupt the temporary
    is removed and `path` is left as it was, and local parent folders made here are removed again. An existing
    `path` is replaced only with `force`; `mark` names a folder's completion mark (object stores: uploaded last)."""
    target = as_path(path)
    if target.exists() and not force:
        raise FileExistsError(f"{str(target)!r} already exists; pass --force to replace it")
    if target.exists() and target.is_dir() != directory:
        kind = "a directory" if target.is_dir() else "a file"
        raise FileExistsError(f"{str(target)!r} exists and is {kind}")
    local = is_local(target)
    if local:
        target = Path(os.path.abspath(target))
        clean_stale(target, log)
        made = [p for p in (target.parent, *target.parent.parents) if not p.exists()]  # innermost first
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(target)
    else:
        made, staging = [], Path(tempfile.mkdtemp(prefix="pia-jax-upload-"))
        tmp = staging / target.name
    done = False
    try:
        if directory:
            tmp.mkdir()
        yield tmp
        if local:
            _swap_in(tmp, target, directory)
        else:
            _upload(tmp, target, directory, mark)
        done = True
    finally:
        if local:
            if tmp.exists() or tmp.is_symlink():
                _remove(tmp)
            for folder in made if not done else ():
                with contextlib.suppress(OSError):
                    folder.rmdir()
        else:
            shutil.rmtree(staging, ignore_errors=True)


def _swap_in(tmp: Path, target: Path, directory: bool):
    if not directory or not target.exists():
        os.replace(tmp, target)  # a file, or a folder where there is none (or an empty one)
        return
    old = temp_sibling(target)  # the old folder goes away only once the new one is in place
    target.rename(old)
    try:
        tmp.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old)


def _upload(tmp: Path, target: epath.Path, directory: bool, mark: str | None):
    if not directory:
        epath.Path(tmp).copy(target, overwrite=True)
        return
    if target.exists():
        if mark and (target / mark).exists():
            (target / mark).unlink()  # no longer complete, before anything of it changes
        target.rmtree()
    files = sorted((p for p in tmp.rglob("*") if p.is_file()), key=lambda p: p.relative_to(tmp).as_posix() == mark)
    for f in files:  # the mark last
        dst = target / f.relative_to(tmp).as_posix()
        dst.parent.mkdir(parents=True, exist_ok=True)
        epath.Path(f).copy(dst, overwrite=True)
