"""Training-time image augmentation: what to do (``AugmentConfig``) and the
Keras layers that do it on a batch (``build_augmenter``), in the tf.data
pipeline or inside the model on the accelerator. Keras and ``keras.ops`` only:
no TensorFlow, so it runs under any Keras backend.
"""

import dataclasses

import keras
from keras import ops


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation; every image draws its own parameters."""

    crop_flip: bool = True        # random crop + horizontal flip
    crop: str = "pad"             # "pad": pad-and-crop at the image size (CIFAR); "resized":
    #                               random resized crop from the full image (ImageNet)
    crop_padding: int = 4         # pixels of zero padding for the "pad" crop
    crop_scale: tuple = (0.08, 1.0)   # "resized": range of the crop's share of the area
    crop_ratio: tuple = (3 / 4, 4 / 3)  # "resized": range of the crop's aspect ratio
    rotation: float = 0.0         # max rotation in degrees; 0 = off
    color_jitter: float = 0.0     # brightness / contrast / saturation strength 0..1; 0 = off
    erasing: float = 0.0          # probability of random erasing (cutout) per image; 0 = off
    mixup: float = 0.0            # Beta(alpha, alpha) of mixup; 0 = off
    cutmix: float = 0.0           # Beta(alpha, alpha) of cutmix; 0 = off
    randaugment: int = 0          # RandAugment ops per image; 0 = off
    randaugment_magnitude: float = 0.5  # RandAugment strength 0..1
    alternate_flip: bool = False  # mirror each image in every other pass instead of at
    #                               random (the first pass mirrors a random half)
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
        if self.alternate_flip and not self.crop_flip:
            raise ValueError("augment.alternate_flip: needs crop_flip (it replaces the random "
                             "flip); turn crop_flip on or alternate_flip off")
        if self.crop not in ("pad", "resized"):
            raise ValueError(f"augment.crop: got {self.crop!r}; allowed: pad, resized")
        for field, top in (("crop_scale", 1.0), ("crop_ratio", None)):
            lo_hi = getattr(self, field)
            if (len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]
                    or (top is not None and lo_hi[1] > top)):
                raise ValueError(f"augment.{field}: got {lo_hi!r}; must be (low, high) with "
                                 f"0 < low <= high{' <= 1' if top else ''}")


@keras.saving.register_keras_serializable("keras_resnet")
class RandomPadCrop(keras.layers.Layer):
    """Pad-and-crop, per image: zero-pad by ``padding`` pixels, cut a window of the
    input size at a random offset, so each image moves by its own integer shift of
    at most ``padding`` pixels in each direction (the CIFAR crop).

    Why not Keras's: ``RandomCrop`` cuts one window for the whole batch, and
    ``RandomTranslation`` is marked not jit-compatible, so a model holding it
    trains without XLA. This is one gather on ``keras.ops``: any backend, under jit.
    """

    def __init__(self, padding=4, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.padding, self.seed = int(padding), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training or not self.padding:
            return images
        p = self.padding
        batch = ops.shape(images)[0]
        height, width, channels = images.shape[1], images.shape[2], images.shape[3]
        padded_height, padded_width = height + 2 * p, width + 2 * p
        padded = ops.pad(images, [[0, 0], [p, p], [p, p], [0, 0]])
        offsets = keras.random.randint((batch, 2), 0, 2 * p + 1, seed=self.seed_generator)
        rows = offsets[:, :1] + ops.arange(height, dtype="int32")[None]  # (batch, height)
        cols = offsets[:, 1:] + ops.arange(width, dtype="int32")[None]   # (batch, width)
        # The pixels of the padded batch in one row each: pixel (image, row, col) is
        # row image * padded_height * padded_width + row * padded_width + col. One
        # ops.take of int32 indices, not two take_along_axis: on TensorFlow those cast
        # the indices to int64 and transpose them, which oneDNN does not take (an
        # "oneDNN supports DT_INT64 only" error line, then Eigen's slower kernels).
        # int32 holds batch * padded pixels below 2**31 (a batch of 25 GB of float32
        # images).
        first = ops.arange(batch, dtype="int32")[:, None, None] * (padded_height * padded_width)
        index = first + rows[:, :, None] * padded_width + cols[:, None, :]
        return ops.take(ops.reshape(padded, (-1, channels)), index, axis=0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "padding": self.padding, "seed": self.seed}


def build_augmenter(config, image_size, seed=None):
    """Batched image augmentation as Keras layers (per-image random parameters).

    Every layer here is jit-compatible except ``RandomRotation`` (Keras marks it
    so); with it on, ``compile(jit_compile=True)`` falls back to no XLA.
    """
    layers = keras.layers
    aug = []
    if config.crop_flip and config.crop == "pad":
        aug.append(RandomPadCrop(config.crop_padding, seed=seed, dtype="float32",
                                 name="aug_crop"))
    # The "resized" crop happens per image, before batching; so does the alternating flip,
    # which needs to know each image (make_train_dataset, arrays.BatchFeed).
    if config.crop_flip and not config.alternate_flip:
        aug.append(layers.RandomFlip("horizontal", seed=seed, dtype="float32",
                                     name="aug_flip"))
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
