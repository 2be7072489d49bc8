"""Input pipelines: CIFAR-10/100 from tensorflow-datasets or an image folder.

Sources give unbatched ``(uint8 image, int label)`` datasets, decoded once and
cached; ``make_train_dataset`` then shuffles (seeded), augments, batches and
prefetches. Images stay in 0..255: normalisation lives in the model (see
``keras_resnet.model.build_classifier``), so a served model sees exactly
what training saw.
"""

import dataclasses
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
TFDS_DATASETS = ("cifar10", "cifar100")
# Known per-channel statistics (0..255 scale) of the official training splits.
KNOWN_STATS = {
    "cifar10": ((125.31, 122.95, 113.87), (62.99, 62.09, 66.70)),
    "cifar100": ((129.30, 124.07, 112.43), (68.17, 65.39, 70.42)),
}


class DataError(ValueError):
    """The data asked for is missing or unusable; the message says how to fix it."""


@dataclasses.dataclass
class Splits:
    """Raw (uint8 image, int label) datasets, unbatched and cached."""

    train: tf.data.Dataset
    validation: tf.data.Dataset | None
    test: tf.data.Dataset | None
    class_names: list
    image_size: tuple
    mean: tuple  # per channel, 0..255 scale
    std: tuple
    num_train: int
    num_validation: int
    num_test: int
    report: dict = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self):
        return len(self.class_names)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation; every image draws its own parameters."""

    crop_flip: bool = True        # pad-and-random-crop + horizontal flip (CIFAR default)
    crop_padding: int = 4         # pixels of zero padding for the random crop
    rotation: float = 0.0         # max rotation in degrees; 0 = off
    color_jitter: float = 0.0     # brightness / contrast / saturation strength 0..1; 0 = off
    erasing: float = 0.0          # probability of random erasing (cutout) per image; 0 = off
    mixup: float = 0.0            # Beta(alpha, alpha) of mixup; 0 = off
    cutmix: float = 0.0           # Beta(alpha, alpha) of cutmix; 0 = off
    randaugment: int = 0          # RandAugment ops per image; 0 = off
    randaugment_magnitude: float = 0.5  # RandAugment strength 0..1
    in_model: bool = False        # run the image augmentations inside the model

    def __post_init__(self):
        for field in ("crop_padding", "rotation", "color_jitter", "erasing", "mixup",
                      "cutmix", "randaugment", "randaugment_magnitude"):
            if getattr(self, field) < 0:
                raise ValueError(f"augment.{field}: got {getattr(self, field)}; must be >= 0")
        for field in ("color_jitter", "erasing", "randaugment_magnitude"):
            if getattr(self, field) > 1:
                raise ValueError(f"augment.{field}: got {getattr(self, field)}; must be <= 1")
        if self.mixup and self.cutmix:
            raise ValueError("augment: mixup and cutmix are exclusive; set one of them to 0")


# ----------------------------------------------------------------------------- sources


def load_splits(dataset="cifar10", *, data_dir=None, tfds_data_dir=None,
                validation_size=5000, max_train_images=None, max_eval_images=None,
                image_size=None, seed=0):
    """Load train / validation / test splits from tfds or an image folder.

    Args:
        dataset: tfds name ("cifar10" or "cifar100"); ignored with ``data_dir``.
        data_dir: an image folder ``root`` laid out ``root/<split>/<class>/*.jpg|png``
            (the one meaning of ``data_dir`` in this package); None = tfds.
        tfds_data_dir: tfds data directory (default: ``TFDS_DATA_DIR`` or
            ~/tensorflow_datasets).
        validation_size: images carved from the training split for validation
            (a ``root/val`` folder is used instead when present); 0 = none.
        max_train_images, max_eval_images: use subsets (a seeded choice for
            folders, the first N for tfds), cut after the validation split is
            carved, so it stays the same set.
        image_size: (height, width) for folders; default: the most common size.
        seed: seeds the subset choice.

    Raises:
        DataError: the data is missing; the message says what was looked for.
    """
    if validation_size < 0:
        raise ValueError(f"validation_size: got {validation_size}; must be >= 0")
    for name, value in (("max_train_images", max_train_images),
                        ("max_eval_images", max_eval_images)):
        if value is not None and value < 1:
            raise ValueError(f"{name}: got {value}; must be >= 1 or None")
    if data_dir is not None:
        return _folder_splits(data_dir, validation_size, max_train_images,
                              max_eval_images, image_size, seed)
    return _tfds_splits(dataset, tfds_data_dir, validation_size, max_train_images,
                        max_eval_images)


def _tfds_splits(dataset, data_dir, validation_size, max_train, max_eval):
    import tensorflow_datasets as tfds

    if dataset not in TFDS_DATASETS:
        raise ValueError(f"dataset: got {dataset!r}; allowed: {', '.join(TFDS_DATASETS)} "
                         "(or pass an image folder)")
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR")
    train_end = f"-{validation_size}" if validation_size else ""
    split_names = {"train": f"train[:{train_end}]" if validation_size else "train",
                   "validation": f"train[{train_end}:]" if validation_size else None,
                   "test": "test"}
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
    (train, num_train), (test, num_test) = loaded["train"], loaded["test"]
    validation, num_validation = loaded["validation"] or (None, 0)
    return Splits(train, validation, test, list(info.features["label"].names), (32, 32),
                  mean, std, num_train, num_validation, num_test)


def list_image_folder(split_dir, class_names=None):
    """Files and labels of ``split_dir/<class>/*``, class folders sorted into labels."""
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
    paths, labels, empty = [], [], []
    for label, name in enumerate(class_names):
        folder = os.path.join(split_dir, name)
        files = sorted(f for f in os.listdir(folder) if not f.startswith(".")) \
            if os.path.isdir(folder) else []
        files = [os.path.join(folder, f) for f in files
                 if os.path.isfile(os.path.join(folder, f))]
        if not files:
            empty.append(name)
        paths += files
        labels += [label] * len(files)
    return paths, labels, class_names, empty


def scan_images(paths):
    """Open every file once with PIL: which decode, their modes and sizes.

    TensorFlow's decoders fail deep inside a pipeline on a corrupt file; this
    check up front lets us skip such files and report how many.
    """
    from PIL import Image

    def probe(path):
        try:
            with Image.open(path) as im:
                im.load()
                return im.mode, im.size[::-1]
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
            return None

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(probe, paths, chunksize=256))


def _subset(paths, labels, limit, seed):
    """A seeded choice of ``limit`` files (all of them when ``limit`` is None)."""
    if limit and limit < len(paths):
        keep = np.sort(np.random.default_rng(seed).permutation(len(paths))[:limit])
        return [paths[i] for i in keep], [labels[i] for i in keep]
    return paths, labels


def _readable(paths, labels, empty, report, key):
    """The files PIL can open, with what was skipped or converted in ``report[key]``."""
    info = scan_images(paths)
    good = [i for i, v in enumerate(info) if v is not None]
    report[key] = {
        "images": len(good),
        "skipped_unreadable": len(paths) - len(good),
        "converted_mode": sum(1 for v in info if v and v[0] != "RGB"),
        "empty_class_folders": empty,
        "sizes": dict(Counter(f"{v[1][0]}x{v[1][1]}" for v in info if v).most_common()),
    }
    return [paths[i] for i in good], [labels[i] for i in good]


def _folder_split(split_dir, class_names, limit, seed, report, key):
    paths, labels, _, empty = list_image_folder(split_dir, class_names)
    return _readable(*_subset(paths, labels, limit, seed), empty, report, key)


def _folder_splits(root, validation_size, max_train, max_eval, image_size, seed):
    if not os.path.isdir(root):
        raise DataError(f"image folder not found: {root!r}; expected "
                        f"{root}/train/<class>/*.jpg|png (and optionally test/, val/)")
    report = {}
    # As with tfds: the validation split is carved first, then both are cut
    # to max_train / max_eval, so a small trial keeps a proper validation set.
    train_paths, train_labels, names, empty = list_image_folder(os.path.join(root, "train"))
    if not train_paths:
        raise DataError(f"no image files under {os.path.join(root, 'train')!r}")
    val_dir = next((os.path.join(root, d) for d in ("val", "validation")
                    if os.path.isdir(os.path.join(root, d))), None)
    val = None
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
        val_files = _subset([train_paths[i] for i in vi], [train_labels[i] for i in vi],
                            max_eval, seed)
        val = _readable(*val_files, [], report, "validation")
        report["validation"]["carved_from"] = "train"
        train_paths = [train_paths[i] for i in ti]
        train_labels = [train_labels[i] for i in ti]
    train_paths, train_labels = _readable(
        *_subset(train_paths, train_labels, max_train, seed), empty, report, "train")
    if not train_paths:
        raise DataError(f"no readable images under {os.path.join(root, 'train')!r}")
    test = None
    if os.path.isdir(os.path.join(root, "test")):
        test = _folder_split(os.path.join(root, "test"), names, max_eval, seed, report,
                             "test")
    if image_size is None:  # the most common size of the training images
        image_size = next(iter(report["train"]["sizes"])).split("x")
    image_size = tuple(int(s) for s in image_size)
    train = folder_dataset(train_paths, train_labels, image_size).cache()
    mean, std = channel_stats(train)
    return Splits(train, val and folder_dataset(*val, image_size).cache(),
                  test and folder_dataset(*test, image_size).cache(), names, image_size,
                  mean, std, len(train_paths), len(val[0]) if val else 0,
                  len(test[0]) if test else 0, report)


def decode_image(data, image_size):
    """Encoded bytes -> uint8 (H, W, 3): grayscale / RGBA converted, odd sizes resized.

    The one decoder for training, evaluation, calibration and prediction.
    """
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    shape = tf.shape(image)
    same = tf.logical_and(shape[0] == image_size[0], shape[1] == image_size[1])
    image = tf.cond(same, lambda: image, lambda: tf.cast(tf.clip_by_value(tf.round(
        tf.image.resize(image, image_size, antialias=True)), 0, 255), tf.uint8))
    return tf.ensure_shape(image, (*image_size, 3))


def folder_dataset(paths, labels, image_size):
    """Unbatched (uint8 image, int32 label) from image files; decoded in parallel."""
    ds = tf.data.Dataset.from_tensor_slices((list(paths), np.asarray(labels, "int32")))
    return ds.map(lambda p, y: (decode_image(tf.io.read_file(p), image_size), y),
                  num_parallel_calls=AUTOTUNE)


def channel_stats(ds):
    """Per-channel mean and std (0..255 scale) of an (image, label) dataset."""
    total = ds.batch(1024).map(lambda x, _: (
        tf.reduce_sum(tf.cast(x, tf.float64), [0, 1, 2]),
        tf.reduce_sum(tf.square(tf.cast(x, tf.float64)), [0, 1, 2]),
        tf.cast(tf.reduce_prod(tf.shape(x)[:3]), tf.float64)))
    s, sq, n = total.reduce(
        (tf.zeros(3, tf.float64), tf.zeros(3, tf.float64), tf.constant(0.0, tf.float64)),
        lambda acc, v: (acc[0] + v[0], acc[1] + v[1], acc[2] + v[2]))
    mean = s / n
    std = tf.sqrt(sq / n - tf.square(mean))
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


# ----------------------------------------------------------------------- augmentation


def build_augmenter(config, image_size, seed=None):
    """Batched image augmentation as Keras layers (per-image random parameters).

    Keras's ``RandomCrop`` cuts one window for the whole batch, so the
    pad-and-crop is a ``RandomTranslation`` by up to ``crop_padding`` pixels
    with zero fill and nearest sampling: an integer shift per image, which is
    what padding then cropping does.
    """
    layers = keras.layers
    h, w = image_size
    aug = []
    if config.crop_flip:
        aug += [layers.RandomTranslation(config.crop_padding / h, config.crop_padding / w,
                                         fill_mode="constant", interpolation="nearest",
                                         seed=seed, dtype="float32", name="aug_crop"),
                layers.RandomFlip("horizontal", seed=seed, dtype="float32",
                                  name="aug_flip")]
    if config.rotation:
        aug.append(layers.RandomRotation(config.rotation / 360.0, fill_mode="constant",
                                         seed=seed, dtype="float32", name="aug_rotation"))
    if config.color_jitter:
        s = config.color_jitter
        aug.append(layers.RandomColorJitter(value_range=(0, 255), brightness_factor=s,
                                            contrast_factor=s, saturation_factor=(0.5 - s / 2,
                                                                                  0.5 + s / 2),
                                            seed=seed, dtype="float32",
                                            name="aug_color_jitter"))
    if config.erasing:
        aug.append(layers.RandomErasing(factor=config.erasing, scale=(0.02, 0.25),
                                        value_range=(0, 255), seed=seed, dtype="float32",
                                        name="aug_erasing"))
    # float32 whatever the global policy: pixel values, not activations.
    return keras.Sequential(aug, name="augment") if aug else None


def make_train_dataset(ds, batch_size, num_classes, *, augment=AugmentConfig(), seed=0,
                       shuffle_buffer=50_000, image_size=None, drop_remainder=True):
    """Shuffle (seeded, fresh order each epoch), augment, batch, prefetch.

    Yields (float32 images in 0..255, one-hot float32 labels). With
    ``augment.in_model`` the image augmentations are left to the model
    (``build_augmenter``); RandAugment, mixup and cutmix always run here.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: got {batch_size}; must be >= 1")
    image_size = image_size or tuple(ds.element_spec[0].shape[:2])
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
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
