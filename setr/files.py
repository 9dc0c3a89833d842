"""Files: atomic writes (a reader, or a crash, sees the old file or the new one, never a part), output
folders checked before work starts, and telling a local weights file from a Hugging Face hub name.
Imports nothing heavy: the command lines use it before torch is loaded."""
import contextlib
import errno
import os
import tempfile

HUB_PREFIX = "hf-hub:"


def is_hub_id(name):
    """True for `hf-hub:<org>/<model>`, and for `timm/<model>` unless that is a local path."""
    name = os.fspath(name)
    return name.startswith(HUB_PREFIX) or (name.startswith("timm/") and not os.path.exists(name))


def check_writable_dir(path):
    """Prove that folder `path` exists and takes files, or can be created, without creating it (a refused
    command leaves no empty folder behind): its nearest existing ancestor must be a folder in which a
    (nameless, at once removed) file can be made. OSError saying why if not."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(errno.ENOTDIR, f"{existing} is a file, not a folder", existing)
    tempfile.TemporaryFile(dir=existing).close()


def make_writable_dir(path):
    """Create folder `path` (and its parents) and prove that a file can be written in it; OSError if not."""
    os.makedirs(path, exist_ok=True)
    tempfile.TemporaryFile(dir=path).close()


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


def first_line(error, default="", limit=None):
    """The first line of an exception's message (at most `limit` characters); `default` when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else default
