"""Where the images come from, without TensorFlow: an image folder's files,
listed, header-scanned and split (train / validation / test), and ``Splits``,
the record every pipeline returns. ``keras_resnet.data`` (tf.data) and
``keras_resnet.arrays`` (NumPy, any backend) decode from here.
"""

import contextlib
import dataclasses
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
DECODABLE_FORMATS = ("JPEG", "PNG", "BMP", "GIF")  # what tf.io.decode_image reads (PIL names)
SCAN_LIMIT = 20_000    # splits up to this many files get their headers read up front
SIZE_SAMPLE = 256      # headers read from a larger split, for its sizes


class DataError(ValueError):
    """The data asked for is missing or unusable; the message says how to fix it."""


@dataclasses.dataclass
class Splits:
    """Raw (uint8 image, int label) splits: unbatched tf.data datasets, or NumPy
    (uint8 images, int32 labels) pairs for the memory pipeline."""

    train: object                  # a tf.data.Dataset, or (images, labels) arrays
    validation: object | None
    test: object | None
    class_names: list
    image_size: tuple
    mean: tuple  # per channel, 0..255 scale
    std: tuple
    num_train: int
    num_validation: int
    num_test: int
    report: dict = dataclasses.field(default_factory=dict)
    pre_shuffled: bool = False  # train streams in a fresh order each epoch already
    counts: dict = dataclasses.field(default_factory=dict)  # split -> DecodeCount (folders)

    @property
    def num_classes(self):
        return len(self.class_names)


@dataclasses.dataclass
class FolderFiles:
    """An image folder's splits as files: ``(paths, labels)`` pairs (None: absent)."""

    class_names: list
    train: tuple
    validation: tuple | None
    test: tuple | None
    image_size: tuple  # (height, width) the images are decoded to
    report: dict       # per split: counts, sizes, what was skipped


def list_image_folder(split_dir, class_names=None):
    """Image files and labels of ``split_dir/<class>/*``, class folders sorted into labels.

    Returns (paths, labels, class_names, empty class folders, files skipped for
    their extension); only ``IMAGE_EXTENSIONS`` are listed.
    """
    if not os.path.isdir(split_dir):
        raise DataError(f"image folder split not found: {split_dir!r}; expected "
                        "<root>/<split>/<class>/*.jpg|png")
    found = sorted(d for d in os.listdir(split_dir)
                   if os.path.isdir(os.path.join(split_dir, d)))
    if class_names is None:
        class_names = found
    if not class_names:
        raise DataError(f"no class folders in {split_dir!r}; expected <class>/*.jpg|png")
    unknown = set(found) - set(class_names)
    if unknown:
        raise DataError(f"{split_dir!r} has class folders not in the training split: "
                        f"{sorted(unknown)}")
    paths, labels, empty, other = [], [], [], 0
    for label, name in enumerate(class_names):
        folder = os.path.join(split_dir, name)
        files = sorted(f for f in os.listdir(folder) if not f.startswith(".")) \
            if os.path.isdir(folder) else []
        files = [os.path.join(folder, f) for f in files
                 if os.path.isfile(os.path.join(folder, f))]
        images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
        other += len(files) - len(images)
        if not images:
            empty.append(name)
        paths += images
        labels += [label] * len(images)
    return paths, labels, class_names, empty, other


def scan_images(paths):
    """Read every file's image header with PIL: (mode, (height, width)) or None.

    Only the header is read (no pixels), so the scan is cheap at any image
    size. None marks a file that is no image, or one in a format TensorFlow's
    decoder cannot read (TIFF, WebP, ...): the pipeline would fail on it.
    Bodies that are corrupt past the header are dropped by the pipeline.
    """
    from PIL import Image

    def probe(path):
        try:
            with Image.open(path) as im:
                if im.format not in DECODABLE_FORMATS:
                    return None
                return im.mode, im.size[::-1]
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
            return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(probe, paths, chunksize=64))


def seeded_subset(paths, labels, limit, seed):
    """A seeded choice of ``limit`` files (all of them when ``limit`` is None)."""
    if limit and limit < len(paths):
        keep = np.sort(np.random.default_rng(seed).permutation(len(paths))[:limit])
        return [paths[i] for i in keep], [labels[i] for i in keep]
    return paths, labels


def _readable(paths, labels, empty, other, report, key):
    """Probe the files (all of them up to ``SCAN_LIMIT``, else a sample for the sizes);
    what was skipped or converted goes to ``report[key]``."""
    scanned, listed = len(paths) <= SCAN_LIMIT, len(paths)
    if scanned:
        info = scan_images(paths)
        good = [i for i, v in enumerate(info) if v is not None]
        paths, labels = [paths[i] for i in good], [labels[i] for i in good]
    else:  # large folder: no up-front pass; bad files are dropped in the pipeline
        sample = np.random.default_rng(0).choice(len(paths), SIZE_SAMPLE, replace=False)
        info = scan_images([paths[i] for i in sample])
    info = [v for v in info if v is not None]
    report[key] = {
        "images": len(paths),
        "skipped_unreadable": listed - len(paths),  # by the header scan; 0 if not scanned
        "skipped_not_image": other,
        "scanned": scanned,
        "converted_mode": sum(1 for v in info if v[0] != "RGB"),
        "empty_class_folders": empty,
        "sizes": dict(Counter(f"{v[1][0]}x{v[1][1]}" for v in info).most_common()),
        "mean_pixels": float(np.mean([v[1][0] * v[1][1] for v in info])) if info else 0.0,
    }
    return paths, labels


def _folder_split(split_dir, class_names, limit, seed, report, key):
    paths, labels, _, empty, other = list_image_folder(split_dir, class_names)
    return _readable(*seeded_subset(paths, labels, limit, seed), empty, other, report, key)


def shard_split(paths, labels, shard):
    """Worker ``index`` of ``count``: every count-th file, all shards the same length."""
    if shard is None:
        return paths, labels
    count, index = shard
    per_worker = len(paths) // count
    return paths[index::count][:per_worker], labels[index::count][:per_worker]


def ram_budget():
    """Bytes of decoded images that ``cache="auto"`` keeps in RAM: a quarter of it."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def folder_files(root, validation_size, max_train, max_eval, image_size, seed, *,
                 shard=None, with_test=True):
    """The files of an image folder's splits, checked: ``FolderFiles``.

    Arguments as in ``keras_resnet.data.load_splits``; every pipeline (tf.data,
    memory) reads the same files in the same order.
    """
    if not os.path.isdir(root):
        raise DataError(f"image folder not found: {root!r}; expected "
                        f"{root}/train/<class>/*.jpg|png (and optionally test/, val/)")
    report = {}
    # As with tfds: the validation split is carved first, then both are cut
    # to max_train / max_eval, so a small trial keeps a proper validation set.
    train_paths, train_labels, names, empty, other = list_image_folder(
        os.path.join(root, "train"))
    if not train_paths:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under "
                        f"{os.path.join(root, 'train')!r}")
    if len(names) - len(empty) < 2:
        raise DataError(f"{os.path.join(root, 'train')!r} has images of "
                        f"{len(names) - len(empty)} class; a classifier needs at least 2 "
                        "class folders with images")
    val_dir = next((os.path.join(root, d) for d in ("val", "validation")
                    if os.path.isdir(os.path.join(root, d))), None)
    val = None
    if validation_size is None:
        validation_size = max(1, len(train_paths) // 10)
    if val_dir:
        val = _folder_split(val_dir, names, max_eval, seed, report, "validation")
    elif validation_size:
        if validation_size >= len(train_paths):
            raise ValueError(f"validation_size: {validation_size} leaves no training images "
                             f"of {len(train_paths)}")
        # A fixed permutation, independent of the training seed: the validation
        # set stays the same across runs and seeds.
        order = np.random.default_rng(12345).permutation(len(train_paths))
        vi, ti = np.sort(order[:validation_size]), np.sort(order[validation_size:])
        val_files = seeded_subset([train_paths[i] for i in vi], [train_labels[i] for i in vi],
                            max_eval, seed)
        val = _readable(*val_files, [], 0, report, "validation")
        report["validation"]["carved_from"] = "train"
        train_paths = [train_paths[i] for i in ti]
        train_labels = [train_labels[i] for i in ti]
    train_paths, train_labels = shard_split(*_readable(
        *seeded_subset(train_paths, train_labels, max_train, seed), empty, other, report, "train"),
        shard)
    if not train_paths:
        raise DataError(f"no readable images under {os.path.join(root, 'train')!r}")
    test = None
    if with_test and os.path.isdir(os.path.join(root, "test")):
        test = _folder_split(os.path.join(root, "test"), names, max_eval, seed, report,
                             "test")
    if image_size is None:  # the most common size of the training images
        image_size = next(iter(report["train"]["sizes"])).split("x")
    image_size = (image_size, image_size) if isinstance(image_size, int) else image_size
    image_size = tuple(int(s) for s in image_size)
    return FolderFiles(names, (train_paths, train_labels), val, test, image_size, report)


@contextlib.contextmanager
def unknown_length_ok():
    """Silence Keras's "Your input ran out of data" for the datasets here: a folder
    pipeline drops files that do not decode, so its length is not known up front,
    and running out at the end of the data is what is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        yield
