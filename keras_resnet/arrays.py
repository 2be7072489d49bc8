"""The memory pipeline: decoded uint8 images held in NumPy arrays, fed to ``fit``
in batches by a ``keras.utils.PyDataset``. No TensorFlow: it runs under any
Keras backend (JAX on a GPU machine that has no TensorFlow), and the image
augmentations run inside the model on the device (``augment_in_model``).

Image folders are decoded with PIL the way ``keras_resnet.data.decode_image``
does it (RGB, resized so the image size covers ``crop_ratio`` of the shorter
side, centre crop); images already of that size pass unchanged, so the
pixels are the same as the tf.data pipeline's. tfds datasets are read
through TensorFlow, when it is installed.
"""

import math
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np

from keras_resnet.sources import DataError, Splits, folder_files, ram_budget, shard_split

DECODE_THREADS = 8


def decode_file(path, image_size, crop_ratio=1.0):
    """An image file -> uint8 (H, W, 3) of ``image_size``; None when it does not decode."""
    from PIL import Image

    h, w = image_size
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (w, h) or crop_ratio != 1.0:
                scale = max(h / im.height, w / im.width) / crop_ratio
                size = (max(w, math.ceil(im.width * scale)), max(h, math.ceil(im.height * scale)))
                # PIL's bilinear filter widens with the scale when shrinking: antialiased,
                # as tf.image.resize(antialias=True) in the tf.data pipeline.
                im = im.resize(size, Image.BILINEAR)
                left, top = (size[0] - w) // 2, (size[1] - h) // 2
                im = im.crop((left, top, left + w, top + h))
            return np.asarray(im, np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def decode_files(paths, labels, image_size, crop_ratio=1.0):
    """(uint8 images (N, H, W, 3), int32 labels (N,), files dropped as undecodable)."""
    images = np.empty((len(paths), *image_size, 3), np.uint8)
    keep = np.ones(len(paths), bool)

    def one(i):
        image = decode_file(paths[i], image_size, crop_ratio)
        if image is None:
            keep[i] = False
        else:
            images[i] = image

    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        list(pool.map(one, range(len(paths))))
    return images[keep], np.asarray(labels, np.int32)[keep], int((~keep).sum())


def check_fits(num_images, image_size, budget=None):
    """Refuse, before decoding, a dataset whose decoded images would not fit in RAM."""
    needed = num_images * int(np.prod(image_size)) * 3
    budget = ram_budget() if budget is None else budget
    if needed > budget:
        raise DataError(
            f"pipeline: memory would hold {num_images} decoded images of "
            f"{image_size[0]}x{image_size[1]} = {needed / 2**30:.2f} GiB, more than the "
            f"{budget / 2**30:.2f} GiB allowed (a quarter of this machine's RAM); use "
            "--pipeline tfdata (it streams from disk), a smaller --image-size or "
            "--max-train-images")
    return needed


def channel_stats(batches):
    """Per-channel mean and std (0..255 scale) of uint8 image batches (N, H, W, 3): an
    array (read in chunks, no float copy of all of it) or any iterable of batches."""
    if isinstance(batches, np.ndarray):
        images = batches
        batches = (images[s:s + 4096] for s in range(0, len(images), 4096))
    total, squares, n = np.zeros(3), np.zeros(3), 0
    for batch in batches:
        chunk = np.asarray(batch, np.float64)
        total += chunk.sum(axis=(0, 1, 2))
        squares += np.square(chunk).sum(axis=(0, 1, 2))
        n += chunk.shape[0] * chunk.shape[1] * chunk.shape[2]
    mean = total / n
    std = np.sqrt(squares / n - mean ** 2)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def load_memory_splits(dataset="cifar10", *, data_dir=None, tfds_data_dir=None,
                       validation_size=5000, max_train_images=None, max_eval_images=None,
                       image_size=None, seed=0, eval_crop_ratio=1.0, stats=True, shard=None,
                       with_test=True, budget=None):
    """Train / validation / test as (uint8 images, int32 labels) arrays in RAM.

    Arguments as in ``keras_resnet.data.load_splits``. The decoded size is
    estimated from the file list and refused (``DataError``) when over
    ``budget`` (default: a quarter of the RAM), before anything is decoded.
    """
    if data_dir is None:
        return _tfds_arrays(dataset, tfds_data_dir, validation_size, max_train_images,
                            max_eval_images, with_test, shard)
    files = folder_files(data_dir, validation_size, max_train_images, max_eval_images,
                         image_size, seed, shard=shard, with_test=with_test)
    size, report = files.image_size, files.report
    parts = {"train": files.train, "validation": files.validation, "test": files.test}
    check_fits(sum(len(p[0]) for p in parts.values() if p), size, budget)
    arrays = {}
    for key, part in parts.items():
        if not part:
            arrays[key] = None
            continue
        ratio = 1.0 if key == "train" else eval_crop_ratio
        images, labels, dropped = decode_files(*part, size, ratio)
        report[key]["skipped_undecodable"] = dropped
        report[key]["cache"] = "memory"
        arrays[key] = (images, labels)
    train = arrays["train"]
    if not len(train[0]):
        raise DataError(f"no decodable images under {data_dir!r}/train")
    mean, std = channel_stats(train[0]) if stats else ((0.0,) * 3, (1.0,) * 3)
    count = {k: len(v[0]) if v else 0 for k, v in arrays.items()}
    return Splits(train, arrays["validation"], arrays["test"], files.class_names, size, mean,
                  std, count["train"], count["validation"], count["test"], report)


def _tfds_arrays(dataset, tfds_data_dir, validation_size, max_train, max_eval, with_test,
                 shard=None):
    """A tfds dataset read into arrays (this process's ``shard`` of the training
    split); tfds needs TensorFlow."""
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        raise DataError(f"dataset: {dataset!r} comes from tensorflow-datasets, which needs "
                        "TensorFlow, and it is not installed here; pass an image folder "
                        "with --data-dir (root/train/<class>/*.jpg)") from None
    from keras_resnet import data as data_lib

    splits = data_lib.load_splits(dataset, tfds_data_dir=tfds_data_dir,
                                  validation_size=validation_size, max_train_images=max_train,
                                  max_eval_images=max_eval, with_test=with_test)
    check_fits(splits.num_train + splits.num_validation + splits.num_test, splits.image_size)

    def to_arrays(ds):
        if ds is None:
            return None
        pairs = list(ds.batch(4096).as_numpy_iterator())
        return (np.concatenate([p[0] for p in pairs]).astype(np.uint8),
                np.concatenate([p[1] for p in pairs]).astype(np.int32))

    train = shard_split(*to_arrays(splits.train), shard)
    return Splits(train, to_arrays(splits.validation), to_arrays(splits.test),
                  splits.class_names, splits.image_size, splits.mean, splits.std,
                  len(train[0]), splits.num_validation, splits.num_test)


class BatchFeed(keras.utils.PyDataset):
    """Batches of (float32 images in 0..255, one-hot float32 labels) from arrays.

    ``shuffle``: a fresh seeded order each epoch, the last partial batch dropped
    (every step the same size, as the tf.data pipeline). Else in order, all
    images. ``labels=None`` yields images only (for ``predict``).
    ``alternate_flip``: the first epoch mirrors a random half of the images, each
    later epoch the images the one before did not (``data.alternating_flip``).
    """

    def __init__(self, images, labels, batch_size, num_classes, *, shuffle=False, seed=0,
                 workers=2, alternate_flip=False):
        super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=8)
        if batch_size < 1:
            raise ValueError(f"batch_size: got {batch_size}; must be >= 1")
        self.images, self.labels = images, labels
        self.batch_size, self.num_classes, self.shuffle = batch_size, num_classes, shuffle
        self.rng = np.random.default_rng(seed)
        self.one_hot = np.eye(num_classes, dtype=np.float32)
        self.order = self.rng.permutation(len(images)) if shuffle else None
        self.mirror_first = (self.rng.random(len(images)) < 0.5) if alternate_flip else None
        self.epoch = 0

    def __len__(self):
        if self.shuffle:
            return len(self.images) // self.batch_size
        return math.ceil(len(self.images) / self.batch_size)

    def __getitem__(self, index):
        window = slice(index * self.batch_size, (index + 1) * self.batch_size)
        picked = self.order[window] if self.shuffle else window
        images = self.images[picked].astype(np.float32)
        if self.mirror_first is not None:
            mirror = self.mirror_first[picked] ^ bool(self.epoch % 2)
            images[mirror] = images[mirror, :, ::-1]
        if self.labels is None:
            return images
        return images, self.one_hot[self.labels[picked]]

    def on_epoch_end(self):
        self.epoch += 1
        if self.shuffle:
            self.order = self.rng.permutation(len(self.images))
