"""
The one atomic writer: a file counts as written only once it is whole under its final name.

    with atomic_path(path) as tmp:      # write tmp any way (open, np.memmap, tofile, torch.save)
        ...
    atomic_write(path, b"...")          # bytes, str, or a function of a binary file object

The content goes to a temporary name in the same directory (`.<name>.tmp<pid>`), is fsynced,
renamed over the final name, and the directory is fsynced: a crash mid-write leaves the previous
file untouched, and run_dir.remove_leftover_temporaries clears what a crash left. A failure of
the environment (a full disk, no permission, a read-only file system) is a WriteError naming the
file, the cause and the free space.
"""

import errno
import os
import re
from contextlib import contextmanager
from pathlib import Path

from wagpt.errors import UserError, WriteError


@contextmanager
def atomic_path(path):
    """`with atomic_path(path) as tmp:` write the file `tmp` (any way: open, np.memmap, tofile);
    when the block succeeds it is fsynced and renamed to `path` and the directory fsynced. On an
    exception the temporary file is removed and `path` is untouched."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(write_failure(path, e)) from None
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        # I/O failures are the environment's, not bugs: torch.save reports a full disk as a
        # RuntimeError ("unexpected pos", "file write failed") with the errno lost
        if isinstance(e, OSError) and not isinstance(e, UserError) or (
                isinstance(e, RuntimeError) and re.search(r"unexpected pos|write", str(e))):
            raise WriteError(write_failure(path, e)) from None
        raise
    # fsync the directory so the rename itself survives a power loss
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_failure(path, error):
    path = Path(path)
    existing = next((p for p in path.parents if p.exists()), Path.cwd())   # the disk it is on
    try:
        usage = os.statvfs(existing)
        free = usage.f_bavail * usage.f_frsize
    except OSError:
        free = None
    code = getattr(error, "errno", None)   # torch's write errors carry none
    full = code in (errno.ENOSPC, errno.EDQUOT) or (
        code is None and free is not None and free < 64 * 2**20)
    cause = "no space left on the device" if full else " ".join(str(error).split())[:200]
    space = "" if free is None else f" ({free / 2**20:.0f} MiB free there)"
    fix = ("Free space or choose another out_dir" if full else
           "Check that the folder is writable (permissions, a read-only file system) or choose "
           "another out_dir")
    return (f"could not write {path}: {cause}{space}; the files written before it are intact. "
            f"{fix}")


def atomic_write(path, content):
    """Write `content` (bytes, str, or a function of a binary file object) to `path`
    atomically. Returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
    return Path(path)
