"""Input pipelines: CIFAR-10/100 from tensorflow-datasets or an image folder.

Sources give unbatched ``(uint8 image, int label)`` datasets, decoded once and
cached; ``make_train_dataset`` then shuffles (seeded), augments, batches and
prefetches. Images stay in 0..255: normalisation lives in the model (see
``keras_resnet.model.build_classifier``), so a served model sees exactly
what training saw.
"""

import glob
import os

import keras
import numpy as np
import tensorflow as tf

# Re-exported: the augmentation and the file listing are part of this module's API.
from keras_resnet.augment import AugmentConfig, RandomPadCrop, build_augmenter  # noqa: F401
from keras_resnet.sources import (  # noqa: F401
    IMAGE_EXTENSIONS,
    DataError,
    Splits,
    folder_files,
    list_image_folder,
    ram_budget,
    scan_images,
    seeded_subset,
    unknown_length_ok,
)

AUTOTUNE = tf.data.AUTOTUNE
CACHES = ("auto", "memory", "none")  # or a folder path: a disk cache
STATS_SAMPLE = 5_000   # images the channel statistics come from when not cached in memory
DISK_SHUFFLE_BUFFER = 10_000  # images in the shuffle window over a disk cache
TFDS_DATASETS = ("cifar10", "cifar100")
# Known per-channel statistics (0..255 scale) of the official training splits.
KNOWN_STATS = {
    "cifar10": ((125.31, 122.95, 113.87), (62.99, 62.09, 66.70)),
    "cifar100": ((129.30, 124.07, 112.43), (68.17, 65.39, 70.42)),
}


# ----------------------------------------------------------------------------- sources


def load_splits(dataset="cifar10", *, data_dir=None, tfds_data_dir=None,
                validation_size=5000, max_train_images=None, max_eval_images=None,
                image_size=None, seed=0, cache="auto", resize_train=True,
                eval_crop_ratio=1.0, stats=True, shard=None, with_test=True):
    """Load train / validation / test splits from tfds or an image folder.

    Args:
        dataset: tfds name ("cifar10" or "cifar100"); ignored with ``data_dir``.
        data_dir: an image folder ``root`` laid out ``root/<split>/<class>/*.jpg|png``
            (the one meaning of ``data_dir`` in this package); None = tfds.
        tfds_data_dir: tfds data directory (default: ``TFDS_DATA_DIR`` or
            ~/tensorflow_datasets).
        validation_size: images carved from the training split for validation
            (a ``root/val`` folder is used instead when present); 0 = none; None =
            a tenth of a folder's training images (5,000 for tfds).
        max_train_images, max_eval_images: use subsets (a seeded choice for
            folders, the first N for tfds), cut after the validation split is
            carved, so it stays the same set.
        image_size: N or (height, width) for folders; default: the most common size.
        seed: seeds the subset choice and the streamed order.
        cache: folders: "memory" keeps the decoded images in RAM, "none" decodes
            them every epoch (memory stays flat, whatever the folder's size), a
            folder path caches them on disk; "auto" = memory when a split fits a
            quarter of the RAM (estimated from its image headers), else none.
        resize_train: folders: decode training images to ``image_size`` (for the
            pad-and-crop augmentation); False keeps their own size, for
            ``make_train_dataset``'s random resized crop.
        eval_crop_ratio: folders: validation / test images are resized so that
            ``image_size`` covers this fraction of them, then centre-cropped.
        stats: compute the training split's channel mean / std (not needed
            with pretrained weights, which bring their own).
        shard: (count, index): this worker's disjoint share of the training files.
        with_test: False leaves the test split unread (``Splits.test`` is None), as a
            hyperparameter search must.

    Raises:
        DataError: the data is missing; the message says what was looked for.
    """
    if validation_size is not None and validation_size < 0:
        raise ValueError(f"validation_size: got {validation_size}; must be >= 0 or None")
    for name, value in (("max_train_images", max_train_images),
                        ("max_eval_images", max_eval_images)):
        if value is not None and value < 1:
            raise ValueError(f"{name}: got {value}; must be >= 1 or None")
    if not (cache in CACHES or isinstance(cache, (str, os.PathLike))):
        raise ValueError(f"cache: got {cache!r}; allowed: {', '.join(CACHES)} or a folder")
    if not 0 < eval_crop_ratio <= 1:
        raise ValueError(f"eval_crop_ratio: got {eval_crop_ratio}; must be in (0, 1]")
    if data_dir is not None:
        return _folder_splits(data_dir, validation_size, max_train_images,
                              max_eval_images, image_size, seed, cache=cache,
                              resize_train=resize_train, eval_crop_ratio=eval_crop_ratio,
                              stats=stats, shard=shard, with_test=with_test)
    return _tfds_splits(dataset, tfds_data_dir,
                        5000 if validation_size is None else validation_size, max_train_images,
                        max_eval_images, with_test)


def _tfds_splits(dataset, data_dir, validation_size, max_train, max_eval, with_test=True):
    import tensorflow_datasets as tfds

    if dataset not in TFDS_DATASETS:
        raise ValueError(f"dataset: got {dataset!r}; allowed: {', '.join(TFDS_DATASETS)} "
                         "(or pass an image folder)")
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR")
    train_end = f"-{validation_size}" if validation_size else ""
    split_names = {"train": f"train[:{train_end}]" if validation_size else "train",
                   "validation": f"train[{train_end}:]" if validation_size else None,
                   "test": "test" if with_test else None}
    loaded = {}
    for key, split in split_names.items():
        if split is None:
            loaded[key] = None
            continue
        try:
            # download=False: these machines have no network, and tfds would
            # retry a download for minutes before failing.
            ds, info = tfds.load(dataset, split=split, data_dir=data_dir,
                                 as_supervised=True, download=False, with_info=True)
        except (AssertionError, tfds.core.registered.DatasetNotFoundError, OSError) as e:
            where = data_dir or "~/tensorflow_datasets (set TFDS_DATA_DIR or --tfds-data-dir)"
            raise DataError(
                f"tensorflow-datasets {dataset!r} is not prepared in {where}, and it "
                "cannot be downloaded here. Either prepare it on a machine with network "
                f"access (tfds.builder({dataset!r}).download_and_prepare()) and copy the "
                f"data directory here, or pass an image folder laid out "
                f"root/train/<class>/*.jpg (e.g. ../shared/data/cifar10-jpeg). ({e})"
            ) from None
        limit = max_train if key == "train" else max_eval
        ds = (ds.take(limit) if limit else ds).map(lambda x, y: (x, tf.cast(y, tf.int32)))
        # tfds knows the size of every split and slice it reads (from its info).
        loaded[key] = ds.cache(), int(ds.cardinality())
    mean, std = KNOWN_STATS[dataset]
    train, num_train = loaded["train"]
    test, num_test = loaded["test"] or (None, 0)
    validation, num_validation = loaded["validation"] or (None, 0)
    return Splits(train, validation, test, list(info.features["label"].names), (32, 32),
                  mean, std, num_train, num_validation, num_test)


class DecodeCount:
    """Counts the images a split's pipeline decodes while ``active`` (its first
    pass): the listed files it did not decode were dropped as corrupt."""

    def __init__(self, listed):
        self.listed = listed
        self.decoded = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.active = tf.Variable(True, trainable=False)

    def __call__(self, image, label):
        added = tf.cond(self.active, lambda: self.decoded.assign_add(1),
                        lambda: tf.identity(self.decoded))
        with tf.control_dependencies([added]):
            return tf.identity(image), label

    def dropped(self):
        return self.listed - int(self.decoded.numpy())


def _cache_kind(cache, num_bytes, budget):
    if cache == "auto":
        return "memory" if num_bytes <= budget else "none"
    return cache if cache in ("memory", "none") else "path"


def _folder_splits(root, validation_size, max_train, max_eval, image_size, seed, *,
                   cache="auto", resize_train=True, eval_crop_ratio=1.0, stats=True,
                   shard=None, memory_budget=None, with_test=True):
    files = folder_files(root, validation_size, max_train, max_eval, image_size, seed,
                         shard=shard, with_test=with_test)
    names, (train_paths, train_labels), val, test = (
        files.class_names, files.train, files.validation, files.test)
    image_size, report = files.image_size, files.report
    budget = ram_budget() if memory_budget is None else memory_budget
    pixels = report["train"]["mean_pixels"] if not resize_train else np.prod(image_size)
    train_cache = _cache_kind(cache, len(train_paths) * pixels * 3, budget)
    report["train"]["cache"] = train_cache
    # A streamed training split reads ahead into the next epoch: its count would not
    # be exact, so only cached ones (decoded exactly once) are counted.
    counts = {"train": DecodeCount(len(train_paths))} if train_cache != "none" else {}
    train = _train_source(train_paths, train_labels, image_size, resize_train, train_cache,
                          cache, seed, counts.get("train"))

    def held_out(files, key):
        if not files:
            return None
        kind = _cache_kind(cache, len(files[0]) * np.prod(image_size) * 3, budget)
        counts[key] = DecodeCount(len(files[0]))
        ds = folder_dataset(*files, image_size, crop_ratio=eval_crop_ratio,
                            count=counts[key])
        return _cached(ds, kind, cache, key)

    mean, std = (0.0,) * 3, (1.0,) * 3
    if stats:
        # Over every training image when they are in memory (one pass, which
        # fills the cache); else over a seeded sample, decoded once.
        sample = (train if train_cache == "memory" and resize_train else
                  folder_dataset(*seeded_subset(train_paths, train_labels, STATS_SAMPLE, seed),
                                 image_size, crop_ratio=eval_crop_ratio))
        mean, std = channel_stats(sample)
    return Splits(train, held_out(val, "validation"), held_out(test, "test"), names,
                  image_size, mean, std, len(train_paths), len(val[0]) if val else 0,
                  len(test[0]) if test else 0, report,
                  pre_shuffled=train_cache != "memory", counts=counts)


def _cached(ds, kind, cache, key):
    if kind == "memory":
        return ds.cache()
    if kind == "path":
        os.makedirs(cache, exist_ok=True)
        prefix = os.path.join(cache, key)
        for stale in glob.glob(prefix + "*.lockfile"):  # left by a killed run
            os.remove(stale)
        return ds.cache(prefix)
    return ds


def _train_source(paths, labels, image_size, resize, kind, cache, seed, count):
    """The training images, decoded in parallel: cached whole in memory (then
    shuffled by ``make_train_dataset``), or streamed in a fresh seeded order
    each epoch (the file list is shuffled, not the decoded images, so memory
    does not grow with the folder)."""
    if kind == "memory":
        return folder_dataset(paths, labels, image_size, native=not resize,
                              count=count).cache()
    if kind == "path":  # decoded once to disk, then shuffled in a bounded window
        ds = _cached(folder_dataset(paths, labels, image_size, native=not resize,
                                    count=count), kind, cache, "train")
        return ds.shuffle(min(len(paths), DISK_SHUFFLE_BUFFER), seed=seed,
                          reshuffle_each_iteration=True)
    files = tf.data.Dataset.from_tensor_slices((list(paths), np.asarray(labels, "int32")))
    files = files.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    return _decode_files(files, image_size, native=not resize, count=count)


def decode_image(data, image_size, crop_ratio=1.0):
    """Encoded bytes -> uint8 (H, W, 3) of ``image_size``: grayscale / RGBA converted,
    other sizes resized so that the crop covers ``crop_ratio`` of the shorter side,
    then centre-cropped (the ImageNet eval transform; ``crop_ratio`` 1 keeps as much
    of the image as the aspect allows).

    The one decoder for evaluation, calibration and prediction.
    """
    return center_crop_resize(decode_native(data), image_size, crop_ratio)


def decode_native(data):
    """Encoded bytes -> uint8 (H, W, 3) at the file's own size."""
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def center_crop_resize(image, image_size, crop_ratio=1.0):
    """Resize (keeping the aspect) so that ``image_size`` covers ``crop_ratio`` of the
    image, then cut the centre; an image of exactly that size passes unchanged."""
    shape = tf.shape(image)
    h, w = image_size
    same = tf.logical_and(shape[0] == h, shape[1] == w)

    def resize():
        scale = tf.maximum(h / tf.cast(shape[0], tf.float32),
                           w / tf.cast(shape[1], tf.float32)) / crop_ratio
        size = tf.cast(tf.math.ceil(tf.cast(shape[:2], tf.float32) * scale), tf.int32)
        size = tf.maximum(size, [h, w])
        resized = tf.image.resize(image, size, antialias=True)
        top, left = (size[0] - h) // 2, (size[1] - w) // 2
        return _to_uint8(resized[top:top + h, left:left + w])

    out = tf.cond(same, lambda: image, resize) if crop_ratio == 1.0 else resize()
    return tf.ensure_shape(out, (h, w, 3))


def random_resized_crop(image, image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        seed=None):
    """A random window of ``scale`` of the area and ``ratio`` aspect, resized to
    ``image_size`` (the ImageNet training crop). Keras has no such layer
    (``RandomCrop`` cuts a fixed size); TensorFlow's box sampler does it."""
    begin, extent, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(image), tf.zeros([1, 0, 4]), seed=seed, area_range=scale,
        aspect_ratio_range=ratio, max_attempts=10, use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, extent)
    return tf.ensure_shape(_to_uint8(tf.image.resize(crop, image_size, antialias=True)),
                           (*image_size, 3))


def _to_uint8(x):
    return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)


def _decode_files(files, image_size, *, native=False, crop_ratio=1.0, count=None):
    """(path, label) -> (uint8 image, label), read and decoded in parallel; a file
    that does not decode is dropped (``ignore_errors``) instead of ending the run."""
    def load(path, label):
        data = tf.io.read_file(path)
        image = decode_native(data) if native else decode_image(data, image_size, crop_ratio)
        return image, label

    ds = files.map(load, num_parallel_calls=AUTOTUNE).ignore_errors()
    return ds.map(count) if count is not None else ds


def folder_dataset(paths, labels, image_size, *, crop_ratio=1.0, native=False, count=None):
    """Unbatched (uint8 image, int32 label) from image files; decoded in parallel.

    ``native`` keeps each image at its own size (for a random resized crop).
    """
    files = tf.data.Dataset.from_tensor_slices((list(paths), np.asarray(labels, "int32")))
    return _decode_files(files, image_size, native=native, crop_ratio=crop_ratio, count=count)


def channel_stats(ds):
    """Per-channel mean and std (0..255 scale) of an (image, label) dataset."""
    from keras_resnet.arrays import channel_stats as of_batches

    return of_batches(ds.batch(1024).map(lambda x, _: x).as_numpy_iterator())


# ----------------------------------------------------------------------- augmentation


def make_train_dataset(ds, batch_size, num_classes, *, augment=None, seed=0,
                       shuffle_buffer=50_000, image_size=None, drop_remainder=True):
    """Shuffle (seeded, fresh order each epoch), augment, batch, prefetch.

    Yields (float32 images in 0..255, one-hot float32 labels). With
    ``augment.in_model`` the image augmentations are left to the model
    (``build_augmenter``); the "resized" crop, RandAugment, mixup and cutmix
    always run here. ``shuffle_buffer`` 0 leaves the order to ``ds`` (a
    streamed source that shuffles its files itself). With ``augment.crop ==
    "resized"``, ``ds`` may hold images of any size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: got {batch_size}; must be >= 1")
    augment = augment or AugmentConfig()
    image_size = tuple(image_size or ds.element_spec[0].shape[:2])
    if augment.alternate_flip:  # AugmentConfig refuses it without crop_flip
        ds = alternating_flip(ds, seed, shuffle_buffer)
    elif shuffle_buffer:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if augment.crop == "resized":
        if augment.crop_flip:
            ds = ds.map(lambda x, y: (random_resized_crop(
                x, image_size, augment.crop_scale, augment.crop_ratio, seed), y),
                num_parallel_calls=AUTOTUNE)
        else:  # no random crop: the eval view
            ds = ds.map(lambda x, y: (center_crop_resize(x, image_size), y),
                        num_parallel_calls=AUTOTUNE)
    if augment.randaugment:
        # RandAugment picks its ops once per call, so it runs per image (before
        # batching) to give each image its own ops.
        rand_augment = keras.layers.RandAugment(
            value_range=(0, 255), num_ops=augment.randaugment,
            factor=augment.randaugment_magnitude, seed=seed, dtype="float32")
        ds = ds.map(lambda x, y: (tf.cast(tf.clip_by_value(rand_augment(
            tf.cast(x, tf.float32)), 0, 255), tf.uint8), y))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32),
                              tf.one_hot(y, num_classes, dtype=tf.float32)),
                num_parallel_calls=AUTOTUNE)
    augmenter = None if augment.in_model else build_augmenter(augment, image_size, seed)
    if augmenter is not None:
        # Sequential map: the Keras layers draw from one seeded generator, so a
        # fixed call order keeps the batches reproducible.
        ds = ds.map(lambda x, y: (tf.clip_by_value(augmenter(x, training=True), 0, 255), y))
    if augment.mixup or augment.cutmix:
        mix = (keras.layers.MixUp(alpha=augment.mixup, seed=seed, dtype="float32")
               if augment.mixup else
               keras.layers.CutMix(factor=augment.cutmix, seed=seed, dtype="float32"))
        ds = ds.map(lambda x, y: _mix(mix, x, y))
    return ds.prefetch(AUTOTUNE)


def alternating_flip(ds, seed, shuffle_buffer):
    """Endless passes over ``ds``, each shuffled, in which each image's mirror alternates:
    the first pass mirrors a random half (drawn per image from ``seed``), every later
    pass mirrors exactly the images the pass before did not (airbench's "alternating
    flip": over a few epochs every image is seen both ways). Keras's ``RandomFlip``
    draws anew per call and does not know the image, so this is done here. A resumed
    run starts again at the first pass's half.
    """
    if not shuffle_buffer:
        raise ValueError("alternate_flip: needs a source held in memory or cached (it tells "
                         "images apart by their position); this one streams its files")
    # Created once, iterated once per pass: its seed generator gives each pass a new order.
    shuffled = ds.enumerate().shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)

    def one_pass(n):
        def flip(i, example):
            image, label = example
            first = tf.random.stateless_uniform([], seed=tf.stack([tf.cast(seed, tf.int64), i]))
            mirror = tf.math.logical_xor(first < 0.5, tf.equal(n % 2, 1))
            return tf.cond(mirror, lambda: tf.reverse(image, axis=[1]), lambda: image), label

        return shuffled.map(flip, num_parallel_calls=AUTOTUNE)

    return tf.data.Dataset.counter().flat_map(one_pass)


def _mix(layer, images, labels):
    out = layer({"images": images, "labels": labels}, training=True)
    return out["images"], out["labels"]


def make_eval_dataset(ds, batch_size, num_classes):
    """Batch for evaluation: (float32 images in 0..255, one-hot labels), in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size: got {batch_size}; must be >= 1")
    return ds.batch(batch_size).map(
        lambda x, y: (tf.cast(x, tf.float32), tf.one_hot(y, num_classes, dtype=tf.float32)),
        num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)
