"""Files written whole or not at all: a temporary file beside the target, then a rename.

The temporary name is unique to the process and the call: the chief and the workers of a
distributed search write the same files of one folder (``search.json``), and a shared
``path.tmp`` let one process rename away the file another was about to rename.
"""

import contextlib
import os
import re
import secrets

# What temp_path appends to a name: ".<pid>-<8 hex>.tmp", then the saver's suffix if any.
TEMP_NAME = re.compile(r"\.\d+-[0-9a-f]{8}\.tmp(\.[A-Za-z0-9.]+)?$")


def temp_path(path, suffix=""):
    """A name beside ``path`` that no other writer uses; it ends in ``.tmp`` + ``suffix``
    (for savers that take the format from the name: ``.png``, ``.weights.h5``)."""
    return f"{os.fspath(path)}.{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}"


@contextlib.contextmanager
def replacing(path, suffix=""):
    """Yield a temporary path to write; renamed to ``path`` when the block ends, removed
    when it raises."""
    tmp = temp_path(path, suffix)
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def write(path, data):
    """``data`` (str or bytes) into ``path``, atomically."""
    with replacing(path) as tmp, open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def remove_temp_files(folder):
    """Delete the temporary files that writers killed before their rename left in
    ``folder`` (call it holding the folder's lock, so no live writer owns them)."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if TEMP_NAME.search(name) and os.path.isfile(path):
            with contextlib.suppress(OSError):
                os.remove(path)
