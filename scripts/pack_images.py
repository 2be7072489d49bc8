"""Pack a folder of images into one file, and unpack it, byte for byte.

For a machine that receives a few large files better than many small ones: the GPU
machines take a working tree of at most 64 MiB, and the CIFAR-10 copy is 60,000 JPEGs of
55 MB (a tar would pad each ~1 KB file to 1.5 KB: 92 MB). The file is an uncompressed
``.npz`` (JPEG and PNG are compressed already) of every file's bytes, their offsets and
their paths relative to the folder; NumPy alone reads it.

    python scripts/pack_images.py pack ../shared/data/cifar10-jpeg cifar10.npz
    python scripts/pack_images.py unpack cifar10.npz /tmp/cifar10-jpeg
"""

import argparse
import os
import shutil
import sys

import numpy as np


def pack(folder, out):
    """Every regular file under ``folder`` into ``out`` (written to a temporary name,
    then renamed); returns the number of files."""
    if not os.path.isdir(folder):
        raise ValueError(f"FOLDER: {folder!r} is not a folder")
    paths = sorted(os.path.relpath(os.path.join(d, f), folder)
                   for d, _, files in os.walk(folder) for f in files)
    if not paths:
        raise ValueError(f"FOLDER: {folder!r} holds no files")
    blobs = []
    for path in paths:
        with open(os.path.join(folder, path), "rb") as f:
            blobs.append(f.read())
    offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
    tmp = f"{out}.partial.npz"  # savez appends .npz to a name without it
    np.savez(tmp, data=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets,
             paths=np.array([p.encode() for p in paths]))
    os.replace(tmp, out)
    return len(paths)


def unpack(packed, folder):
    """The files of ``packed`` under ``folder``, which must not exist yet (they are
    written to ``folder.partial`` first, then renamed); returns the number of files."""
    if os.path.exists(folder):
        raise ValueError(f"FOLDER: {folder!r} exists; unpack into a new folder")
    try:
        with np.load(packed, allow_pickle=False) as f:
            data, offsets, paths = f["data"], f["offsets"], f["paths"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"PACKED: {packed!r} is not a file written by pack ({e})") from None
    names = [os.path.normpath(p.decode()) for p in paths]
    for name in names:
        if os.path.isabs(name) or name.split(os.sep)[0] == "..":
            raise ValueError(f"PACKED: {packed!r} names {name!r}, outside the folder")
    tmp = f"{folder}.partial"
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted unpack left
    for i, name in enumerate(names):
        path = os.path.join(tmp, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as out:
            out.write(data[offsets[i]:offsets[i + 1]].tobytes())
    os.replace(tmp, folder)
    return len(paths)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pack", help="FOLDER -> PACKED (.npz)")
    p.add_argument("folder")
    p.add_argument("packed")
    u = commands.add_parser("unpack", help="PACKED -> FOLDER (a new folder)")
    u.add_argument("packed")
    u.add_argument("folder")
    args = parser.parse_args(argv)
    try:
        if args.command == "pack":
            n = pack(args.folder, args.packed)
            print(f"{n} files, {os.path.getsize(args.packed) / 1e6:.1f} MB -> {args.packed}")
        else:
            n = unpack(args.packed, args.folder)
            print(f"{n} files -> {args.folder}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
