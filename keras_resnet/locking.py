"""One writer per output directory: a lock file naming the process that holds it.

Two trainings on one run directory interleave ``history.csv`` and overwrite each
other's checkpoints; two exports into one folder race on the same files. The
lock file ``.lock`` (pid, host, start time) is created atomically; a second
process is refused with the holder's name, and a lock left by a process that
no longer runs (killed) is taken over.
"""

import contextlib
import json
import os
import socket
import time

LOCK_NAME = ".lock"


class LockedError(ValueError):
    """Another live process holds the output directory."""


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}  # half-written by a killed process: stale


@contextlib.contextmanager
def hold(folder, what="output_dir"):
    """Hold ``folder``'s lock for the ``with`` block (the folder is created).

    Raises:
        LockedError: a live process holds it; the message names that process.
    """
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):  # create atomically; a stale lock is removed, then retried
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            other = _read(path)
            pid, host = other.get("pid"), other.get("host")
            if isinstance(pid, int) and host == me["host"] and _alive(pid):
                raise LockedError(f"{what}: {folder!r} is in use by process {pid} on {host} "
                                  f"(since {other.get('since')}); wait for it to finish or "
                                  "use another folder") from None
            if isinstance(pid, int) and host not in (None, me["host"]):
                raise LockedError(f"{what}: {folder!r} is locked by process {pid} on host "
                                  f"{host}; if that run is over, remove {path}") from None
            print(f"note: taking over {path} left by process {pid}, which no longer runs")
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise LockedError(f"{what}: could not take the lock {path}")
    try:
        yield
    finally:
        if _read(path).get("pid") == me["pid"]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
