"""Writing files a user keeps: always through a temporary name in the same folder and a rename.

A reader (or a kill at any moment) sees the old whole file or the new whole
file, never half of one; a leftover temporary file carries `.tmp-` in its name.
"""

import hashlib
import json
import os

TMP_MARK = ".tmp-"
NAME_MAX = 255  # bytes in one file name on Linux and macOS file systems


def temp_path(path, suffix=""):
    """A temporary name beside `path` (same folder, so the rename is atomic); `suffix` keeps an extension."""
    folder, name = os.path.split(os.path.abspath(path))
    tail = f"{TMP_MARK}{os.getpid()}{suffix}"
    if len(f".{name}{tail}".encode()) > NAME_MAX:  # a long name that fits must not fail for its temp name
        name = hashlib.sha256(name.encode()).hexdigest()[:16]
    return os.path.join(folder, f".{name}{tail}")


def write_atomic(path, write, suffix=""):
    """Call `write(temp_path)`, then move the result onto `path`; the temp file never outlives a failure.

    An OSError (full disk, read-only folder, name too long) is raised again naming `path`, not the temp name.
    """
    tmp = temp_path(path, suffix)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), os.fspath(path)) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_text_atomic(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return write_atomic(path, write)


def write_json_atomic(path, obj):
    return write_text_atomic(path, json.dumps(obj, indent=2))


def save_model_atomic(model, path):
    """Save a Keras model to `path` (.keras): `path` is always the old or the new whole model."""
    import keras

    return write_atomic(path, lambda tmp: keras.saving.save_model(model, tmp), suffix=".keras")


def read_json(path, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def remove_temp_files(folder):
    """Leftovers of writes that a kill interrupted (the files they were for are intact)."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if TMP_MARK in name:
                os.remove(os.path.join(folder, name))


class HeldError(Exception):
    """A lock file another live process holds; the message says who (pid, host, start time)."""


def hold(path):
    """Lock `path` for this process and write who holds it; the open file (close it, or `with` it, to let go).

    Raises HeldError naming the holder when another process has it. An
    fcntl.flock: the kernel lets go when the holder exits, killed or not, so
    a dead run leaves nothing stuck; the file's text only names the holder.
    """
    import fcntl
    import socket
    import time

    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise HeldError(holder) from None
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
    f.flush()
    return f
