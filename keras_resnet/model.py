"""ResNet family as Keras 3 functional-API builders.

Blocks, stages and stems are plain functions ``tensor -> tensor``; a network is
stem + stages + head wired by :func:`build_resnet`. The computation matches
torchvision's ``resnet.py`` exactly (symmetric zero padding, BatchNorm epsilon
1e-5 / momentum 0.9, no conv bias before a BatchNorm, stride in the 3x3 conv of
the bottleneck = "v1.5"), so weights trained with the reference load and give
the same logits. Layer names derive from the block name
(``stage2_block1_conv1``), so weight files map stably across versions.
"""

import os

import keras
from keras import layers

# One source of truth for the depths: depth -> (block kind, blocks per stage).
RESNET_SPECS = {
    10: ("basic", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
STAGE_FILTERS = (64, 128, 256, 512)
STEMS = ("imagenet", "cifar", "deep", "deep_tiered")
POOLINGS = (None, "avg", "max")

# Match PyTorch: BatchNorm2d(eps=1e-5, momentum=0.1) == Keras momentum 0.9.
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


@keras.saving.register_keras_serializable(package="keras_resnet")
class HostVarianceScaling(keras.initializers.VarianceScaling):
    """Keras's ``VarianceScaling``, drawn on the host with NumPy from the instance's seed.

    Why not Keras's own draw: under JAX it compiles one XLA program per kernel
    shape (ResNet-18: 11 of them, a third of a fresh process's compile time on
    CPU), and each backend's generator gives other values for one seed. A NumPy
    draw costs no compile and gives the same kernels on every backend.
    Same distribution and config as ``VarianceScaling``; a ``SeedGenerator``
    seed (a new draw per call) keeps Keras's own path.
    """

    def __call__(self, shape, dtype=None):
        if (not isinstance(self.seed, int) or self.distribution != "untruncated_normal"
                or self.input_axes or self.output_axes or len(shape) < 2):
            return super().__call__(shape, dtype=dtype)
        import numpy as np

        receptive = int(np.prod(shape[:-2]))  # Keras's fans: (..., in, out) kernels
        fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
        fan = {"fan_in": fan_in, "fan_out": fan_out}.get(self.mode, (fan_in + fan_out) / 2)
        values = np.random.default_rng(self.seed).standard_normal(shape, dtype="float32")
        values *= np.float32(np.sqrt(self.scale / max(1.0, fan)))
        return keras.ops.convert_to_tensor(values, dtype=dtype or keras.config.floatx())


def conv_initializer():
    """torchvision's conv init, ``kaiming_normal_(mode="fan_out", relu)``.

    A new instance per layer: an unseeded Keras initializer fixes its seed
    when it is created, so one shared instance would give every kernel of a
    shape the same values. Each instance draws its seed from Python's
    ``random``, which ``keras.utils.set_random_seed`` seeds: one seed, one
    model, in every process and on every backend.
    """
    return HostVarianceScaling(2.0, "fan_out", "untruncated_normal")


def conv_bn(x, filters, kernel_size, stride=1, *, name, index="", groups=1,
            bn=True, relu=True, zero_gamma=False):
    """Conv (PyTorch padding ``k // 2``) -> BatchNorm -> optional ReLU.

    Layers are named ``{name}_conv{index}``, ``{name}_bn{index}``, ... TF's
    ``padding="same"`` pads stride-2 convs asymmetrically (all on the
    bottom/right), which shifts every window against PyTorch; explicit
    symmetric ``ZeroPadding2D`` + ``"valid"`` reproduces the reference. For
    stride 1 and an odd kernel, ``"same"`` already is symmetric.
    """
    pad = kernel_size // 2
    padding = "same"
    if stride > 1 and pad:
        x = layers.ZeroPadding2D(pad, name=f"{name}_pad{index}")(x)
        padding = "valid"
    x = layers.Conv2D(filters, kernel_size, strides=stride, padding=padding,
                      groups=groups, use_bias=False,
                      kernel_initializer=conv_initializer(),
                      name=f"{name}_conv{index}")(x)
    if bn:
        x = batch_norm(x, name=f"{name}_bn{index}", zero_gamma=zero_gamma)
    if relu:
        x = layers.ReLU(name=f"{name}_relu{index}")(x)
    return x


@keras.saving.register_keras_serializable(package="keras_resnet")
class FusedBatchNorm(layers.BatchNormalization):
    """Keras's ``BatchNormalization`` whose training step, on the TensorFlow backend, is
    TensorFlow's fused kernel (``FusedBatchNormV3``: statistics, normalisation and their
    gradient in one oneDNN op each way).

    Keras 3 composes BatchNorm from ``moments`` and element-wise ops, whose forward and
    backward passes each read the activations several times; on CPU that was a fifth of a
    ResNet18 training step (issue 12; ``docs/benchmarks.md``). Same weights, same
    arithmetic (input cast to float32, biased batch variance for the moving average, the
    same moving-average update); inference, other backends, masks and
    ``synchronized=True`` are Keras's own path.
    """

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable and keras.backend.backend() == "tensorflow"
                and mask is None and not self.synchronized and self.scale and self.center
                and len(inputs.shape) == 4 and self.axis in (-1, 3)):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf  # the TensorFlow backend is running: already imported

        x = tf.cast(inputs, "float32")  # as Keras's path: statistics in float32
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x, self.gamma, self.beta, epsilon=self.epsilon, data_format="NHWC",
            is_training=True)
        # The op returns the unbiased (n - 1) batch variance; Keras averages the biased one.
        n = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), "float32")
        variance = variance * (n - 1.0) / n
        for stat, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
            stat.assign(stat * self.momentum + batch * (1.0 - self.momentum))
        return tf.cast(y, self.compute_dtype)


def batch_norm(x, *, name, zero_gamma=False):
    """BatchNorm with the reference epsilon and momentum."""
    return FusedBatchNorm(
        epsilon=BN_EPSILON, momentum=BN_MOMENTUM,
        gamma_initializer="zeros" if zero_gamma else "ones", name=name)(x)


def shortcut(x, filters, stride, *, name, avg_down=False, preact=False):
    """Projection shortcut: 1x1 conv (+BN); ResNet-D average-pools first."""
    if avg_down and stride > 1:
        # ResNet-D: AvgPool(2, ceil_mode, count_include_pad=False) then 1x1/1.
        # Keras "same" average pooling excludes padding from the mean.
        x = layers.AveragePooling2D(stride, strides=stride, padding="same",
                                    name=f"{name}_down_pool")(x)
        stride = 1
    return conv_bn(x, filters, 1, stride, name=f"{name}_down", relu=False,
                   bn=not preact)


def basic_block(x, filters, stride=1, *, name, preact=False, avg_down=False,
                zero_init_residual=False, **_):
    """Two 3x3 convs with an identity or projection shortcut (ResNet-18/34).

    Args:
        filters: output channels of both convs.
        stride: stride of the first 3x3 conv (and of the shortcut).
        preact: pre-activation (v2) form: BN-ReLU before each conv, no
            activation after the addition.
        zero_init_residual: start the last BN gamma at 0 (v1 only), so the
            block starts as identity.
    """
    return _residual(x, [(filters, 3, stride), (filters, 3, 1)], filters, stride,
                     name=name, preact=preact, avg_down=avg_down,
                     zero_init_residual=zero_init_residual)


def bottleneck_block(x, filters, stride=1, *, name, preact=False, avg_down=False,
                     zero_init_residual=False, cardinality=1, base_width=64):
    """1x1 reduce -> 3x3 (strided, grouped) -> 1x1 expand x4 (ResNet-50+).

    The stride sits in the 3x3 conv (ResNet v1.5, as torchvision). The inner
    width is ``int(filters * base_width / 64) * cardinality``: ResNeXt sets
    ``cardinality`` (groups of the 3x3 conv), Wide ResNet doubles
    ``base_width``.
    """
    width = int(filters * base_width / 64) * cardinality
    convs = [(width, 1, 1), (width, 3, stride, cardinality), (filters * 4, 1, 1)]
    return _residual(x, convs, filters * 4, stride, name=name, preact=preact,
                     avg_down=avg_down, zero_init_residual=zero_init_residual)


def _residual(x, convs, out_filters, stride, *, name, preact, avg_down,
              zero_init_residual):
    """Shared body of both blocks: ``convs`` on one path, shortcut on the other.

    v1: conv-BN-ReLU ... conv-BN, add, ReLU. Pre-activation (v2, He et al.
    2016): BN-ReLU before each conv and nothing after the addition; the
    identity path carries ``x`` untouched, and only a projection shortcut
    takes the pre-activated tensor (as timm's ``resnetv2`` and
    ``keras.applications.ResNet50V2``).
    """
    needs_projection = stride != 1 or x.shape[-1] != out_filters
    y = pre = x
    for i, (filters, kernel, conv_stride, *groups) in enumerate(convs, start=1):
        last = i == len(convs)
        if preact:
            y = batch_norm(y, name=f"{name}_bn{i}")
            y = layers.ReLU(name=f"{name}_relu{i}")(y)
            if i == 1:
                pre = y  # the pre-activated input, for a projection shortcut only
        y = conv_bn(y, filters, kernel, conv_stride, name=name, index=i,
                    groups=groups[0] if groups else 1, bn=not preact,
                    relu=not (last or preact), zero_gamma=last and zero_init_residual)
    skip = (shortcut(pre, out_filters, stride, name=name, avg_down=avg_down,
                     preact=preact) if needs_projection else x)
    y = layers.Add(name=f"{name}_add")([skip, y])
    if not preact:
        y = layers.ReLU(name=f"{name}_out")(y)
    return y


def stage(x, block, filters, blocks, stride, *, name, **block_options):
    """Repeat ``block``; the first one carries the stride and the projection."""
    for b in range(1, blocks + 1):
        x = block(x, filters, stride if b == 1 else 1, name=f"{name}_block{b}",
                  **block_options)
    return x


def resnet_stem(x, kind="imagenet", *, width=64, preact=False, name="stem"):
    """The layers before the first stage.

    - ``"imagenet"``: 7x7/2 conv, 3x3/2 max-pool (ResNet paper, torchvision).
    - ``"cifar"``: one 3x3/1 conv, no pool (32x32 inputs keep their resolution).
    - ``"deep"``: three 3x3 convs (width/2, width/2, width), the first strided,
      then the 3x3/2 max-pool (ResNet-C, as timm's ``resnet*d``).
    - ``"deep_tiered"``: the same with widths 3/8 width, width/2, width (24, 32,
      64: timm's ``resnet*t``).

    With ``preact`` the last stem conv has no BN-ReLU: the first block
    normalises its input itself (ResNet v2).
    """
    last = {"bn": not preact, "relu": not preact}  # options of the last stem conv
    if kind == "cifar":
        return conv_bn(x, width, 3, 1, name=name, index=1, **last)
    if kind == "imagenet":
        x = conv_bn(x, width, 7, 2, name=name, index=1, **last)
    else:
        first = 3 * (width // 8) if kind == "deep_tiered" else width // 2
        x = conv_bn(x, first, 3, 2, name=name, index=1)
        x = conv_bn(x, width // 2, 3, 1, name=name, index=2)
        x = conv_bn(x, width, 3, 1, name=name, index=3, **last)
    # v1: zero padding equals PyTorch's -inf padding, the input being post-ReLU.
    # v2 pads with zeros too, as keras.applications.ResNet50V2 and timm's
    # "fixed" stems do.
    x = layers.ZeroPadding2D(1, name=f"{name}_pool_pad")(x)
    return layers.MaxPooling2D(3, strides=2, name=f"{name}_pool")(x)


def build_resnet(depth=18, *, include_top=True, weights=None, input_tensor=None,
                 input_shape=None, pooling=None, classes=1000,
                 classifier_activation="softmax", name=None, stem="imagenet",
                 preact=False, zero_init_residual=False, avg_down=False,
                 cardinality=1, base_width=64, width_multiplier=1.0):
    """Build a ResNet of the given depth (10, 18, 34, 50, 101, 152).

    Arguments follow ``keras.applications.ResNet50``: ``include_top``,
    ``weights`` (None, ``"imagenet"``, or the path of a PyTorch ``.pth`` /
    ``.safetensors`` checkpoint or a ``.weights.h5`` / ``.keras`` file; see
    ``keras_resnet.weights``; the model takes the raw input the weights' reference
    network takes, e.g. ImageNet-normalised pixels),
    ``input_tensor``, ``input_shape``, ``pooling`` (None, "avg", "max", used
    when ``include_top=False``), ``classes``, ``classifier_activation``
    (None gives logits), ``name``. Variants:

    Args:
        stem: "imagenet" (7x7/2 + pool), "cifar" (3x3/1), "deep" (ResNet-C) or
            "deep_tiered" (timm's ``resnet*t``).
        preact: pre-activation blocks (ResNet v2).
        zero_init_residual: last BN gamma of each block starts at 0.
        avg_down: ResNet-D shortcut (average-pool, then 1x1/1 conv).
        cardinality, base_width: ResNeXt grouped 3x3 (e.g. 32, 4); bottleneck only.
        width_multiplier: Wide ResNet; scales the bottleneck's inner width
            (torchvision ``wide_resnet50_2`` is 2) or every basic-block conv.

    Returns:
        A functional ``keras.Model``.
    """
    _validate(depth, stem, pooling, classes, input_shape, weights,
              cardinality, base_width, width_multiplier)
    kind, blocks = RESNET_SPECS[depth]
    if input_shape is None and input_tensor is None:
        input_shape = (32, 32, 3) if stem == "cifar" else (224, 224, 3)
    if input_tensor is None:
        inputs = layers.Input(shape=tuple(input_shape), name="image")
    elif keras.utils.is_keras_tensor(input_tensor):
        inputs = input_tensor
    else:
        inputs = layers.Input(tensor=input_tensor, name="image")

    if kind == "basic":
        block, options = basic_block, {}
        filters = [int(f * width_multiplier) for f in STAGE_FILTERS]
    else:
        block = bottleneck_block
        options = {"cardinality": cardinality,
                   "base_width": int(base_width * width_multiplier)}
        filters = list(STAGE_FILTERS)

    x = resnet_stem(inputs, stem, preact=preact)
    for i, (f, n) in enumerate(zip(filters, blocks), start=1):
        x = stage(x, block, f, n, 1 if i == 1 else 2, name=f"stage{i}",
                  preact=preact, avg_down=avg_down,
                  zero_init_residual=zero_init_residual and not preact, **options)
    if preact:
        x = batch_norm(x, name="post_bn")
        x = layers.ReLU(name="post_relu")(x)

    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        # float32 head: stable logits / softmax under a mixed-precision policy.
        x = layers.Dense(classes, activation=classifier_activation, dtype="float32",
                         name="predictions")(x)
    elif pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)

    if input_tensor is not None:
        inputs = keras.utils.get_source_inputs(input_tensor)
    arch = _default_name(depth, stem, preact, avg_down, cardinality, base_width,
                         width_multiplier)
    model = keras.Model(inputs, x, name=name or arch)
    if weights is not None:
        from keras_resnet.weights import load_weights

        load_weights(model, weights, arch=arch)
    return model


def _default_name(depth, stem, preact, avg_down, cardinality, base_width,
                  width_multiplier):
    if cardinality > 1:
        base = f"resnext{depth}_{cardinality}x{base_width}d"
    elif width_multiplier != 1:
        base = f"wide_resnet{depth}_{width_multiplier:g}"
    else:
        base = f"resnet{depth}"
    if preact:
        base = "preact_" + base
    # timm's suffixes: "c" deep stem, "d" deep stem + average-pool shortcut,
    # "t" tiered deep stem + average-pool shortcut.
    if stem == "deep":
        return base + ("d" if avg_down else "c")
    if stem == "deep_tiered" and avg_down:
        return base + "t"
    if avg_down:
        base += "_avgdown"
    return base if stem == "imagenet" else f"{base}_{stem}"


def _validate(depth, stem, pooling, classes, input_shape, weights,
              cardinality, base_width, width_multiplier):
    if depth not in RESNET_SPECS:
        raise ValueError(f"depth: got {depth!r}; allowed: {sorted(RESNET_SPECS)}")
    if stem not in STEMS:
        raise ValueError(f"stem: got {stem!r}; allowed: {list(STEMS)}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling: got {pooling!r}; allowed: None, 'avg', 'max'")
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise ValueError(f"classes: got {classes!r}; must be an integer >= 1")
    if input_shape is not None:
        shape = tuple(input_shape)
        if len(shape) != 3 or any(s is not None and (not isinstance(s, int) or s < 1)
                                  for s in shape):
            raise ValueError(f"input_shape: got {input_shape!r}; must be "
                             "(height, width, channels) with sizes >= 1 or None")
        min_size = 1 if stem == "cifar" else 32
        if any(s is not None and s < min_size for s in shape[:2]):
            raise ValueError(f"input_shape: got {input_shape!r}; the {stem!r} "
                             f"stem needs height and width >= {min_size}")
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise ValueError(f"weights: got {weights!r}; pass None, 'imagenet' or a file path")
    if RESNET_SPECS[depth][0] == "basic" and (cardinality != 1 or base_width != 64):
        raise ValueError("cardinality / base_width: basic blocks (depth 18, 34) "
                         "support only cardinality=1 and base_width=64")
    if not isinstance(cardinality, int) or cardinality < 1:
        raise ValueError(f"cardinality: got {cardinality!r}; must be an integer >= 1")
    if not base_width > 0 or not width_multiplier > 0:
        raise ValueError("base_width and width_multiplier must be > 0")


def build_resnet18(**kwargs):
    """ResNet-18 (basic blocks, [2, 2, 2, 2]); 11,689,512 params on ImageNet."""
    return build_resnet(18, **kwargs)


def build_resnet34(**kwargs):
    """ResNet-34 (basic blocks, [3, 4, 6, 3])."""
    return build_resnet(34, **kwargs)


def build_resnet50(**kwargs):
    """ResNet-50 (bottleneck v1.5, [3, 4, 6, 3])."""
    return build_resnet(50, **kwargs)


def build_resnet101(**kwargs):
    """ResNet-101 (bottleneck v1.5, [3, 4, 23, 3])."""
    return build_resnet(101, **kwargs)


def build_resnet152(**kwargs):
    """ResNet-152 (bottleneck v1.5, [3, 8, 36, 3])."""
    return build_resnet(152, **kwargs)


# Named variants: one line of builder options each (used by the CLIs).
MODELS = {
    "resnet10t": {"depth": 10, "stem": "deep_tiered", "avg_down": True},  # timm
    "resnet18": {"depth": 18},
    "resnet34": {"depth": 34},
    "resnet50": {"depth": 50},
    "resnet101": {"depth": 101},
    "resnet152": {"depth": 152},
    "resnet18d": {"depth": 18, "stem": "deep", "avg_down": True},
    "resnet50d": {"depth": 50, "stem": "deep", "avg_down": True},
    "preact_resnet18": {"depth": 18, "preact": True},
    "resnext50_32x4d": {"depth": 50, "cardinality": 32, "base_width": 4},
    "resnext101_32x8d": {"depth": 101, "cardinality": 32, "base_width": 8},
    "wide_resnet50_2": {"depth": 50, "width_multiplier": 2},
}


def build_model(name, **kwargs):
    """Build a named variant of ``MODELS``; ``kwargs`` override its options."""
    if name not in MODELS:
        raise ValueError(f"model: got {name!r}; allowed: {', '.join(MODELS)}")
    options = {**MODELS[name], **kwargs}
    return build_resnet(options.pop("depth"), **options)


def build_classifier(name="resnet18", *, image_size, num_classes, mean, std,
                     augmenter=None, **options):
    """A named variant with its preprocessing inside: float 0..255 images in, logits out.

    The ``normalize`` layer carries the training split's per-channel
    ``mean`` / ``std`` (0..255 scale), so a saved or exported model needs no
    preprocessing code outside it.

    Args:
        name: a name of ``MODELS``; ``options`` (``stem``, ``zero_init_residual``,
            ...) override its builder options.
        image_size: (height, width) of the input images.
        augmenter: optional Keras layer applied first (active in training only),
            to augment on the accelerator.
    """
    inputs = keras.Input((*image_size, 3), name="image")
    x = augmenter(inputs) if augmenter is not None else inputs
    # float32 whatever the policy: in bfloat16 the mean itself (123.675) would round
    # to 123.5, and pixels to steps of 1.
    x = layers.Normalization(mean=list(mean), variance=[s * s for s in std],
                             dtype="float32", name="normalize")(x)
    backbone = build_model(name, input_tensor=x, classes=num_classes,
                           classifier_activation=None, **options)
    return keras.Model(inputs, backbone.output, name=backbone.name)
