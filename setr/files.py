"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never a part."""
import contextlib
import os


def write_atomic(path, data):
    """Write `data` to `path` through a temp file in the same folder, fsync, then os.replace.

    data: str (UTF-8), bytes, or a callable write(file) given the open binary file (torch.save).
    The temp file is removed when the write fails (e.g. disk full). Returns path."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path
