"""Training: one config, optimiser and LR schedule, callbacks, a run directory.

``train(config)`` reads top to bottom: validate, data, model, optimiser and
schedule, fit (resumable), report. Everything a run produced lands in
``config.output_dir``: ``config.json``, ``best.keras``, ``last.keras``,
``history.csv``, ``curves.png``, TensorBoard ``logs/``, ``labels.txt``,
``preprocessing.json``, ``test_metrics.json`` and ``confusion_matrix.png``.
Fine-tuning is the same run with a ``FinetuneConfig``: pretrained weights,
their preprocessing, and the layers its mode freezes.
"""

import contextlib
import csv
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time

import keras
import numpy as np

from keras_resnet import arrays, atomic, evaluation, locking, startup, whitening
from keras_resnet import weights as weights_lib
from keras_resnet.augment import AugmentConfig, build_augmenter
from keras_resnet.model import MODELS, STEMS, build_classifier, build_model
from keras_resnet.predict import MAX_TTA_SHIFT
from keras_resnet.sources import unknown_length_ok

OPTIMIZERS = ("sgd", "nesterov", "rmsprop", "adam", "adamw", "muon")
SCHEDULES = ("constant", "step", "cosine", "onecycle", "linear")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
STRATEGIES = ("default", "mirrored", "multiworker", "data-parallel")
TF_STRATEGIES = ("mirrored", "multiworker")  # tf.distribute: the TensorFlow backend
PIPELINES = ("auto", "tfdata", "memory")
BACKENDS = ("tensorflow", "jax")  # Keras backends keras_resnet trains on
ONE_CYCLE_START = 1 / 25  # one-cycle warm-up starts at this fraction of the peak LR
LR_REFERENCE_BATCH = 128  # ``lr`` is given per 128 images; scaled linearly with the batch
WHITEN_IMAGES = 512  # training images whose patches set the whitening filters
# Fields that may differ when a run directory is resumed (they do not change the math).
RESUMABLE_FIELDS = ("output_dir", "verbose", "tta_flip", "tta_shift", "coordinator",
                    "process_id", "coordinator_timeout")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are the project's recipe for CIFAR-10."""

    model: str = "resnet18"            # a name of keras_resnet.MODELS
    stem: str = "cifar"                # imagenet | cifar | deep | deep_tiered
    dataset: str = "cifar10"           # tfds name, used without data_dir
    data_dir: str | None = None        # image folder root/<split>/<class>/*; None = tfds
    tfds_data_dir: str | None = None   # tfds data directory (default: TFDS_DATA_DIR)
    output_dir: str = "runs/resnet18_cifar10"  # run directory; the same one resumes
    epochs: int = 30
    batch_size: int = 128              # per replica; global = batch_size * replicas
    optimizer: str = "muon"            # sgd | nesterov | rmsprop | adam | adamw | muon
    lr: float = 0.01                   # peak LR per 128 images (linear scaling); for SGD
    #                                    (nesterov) the recipe's is 0.4
    momentum: float = 0.9
    weight_decay: float = 0.01         # L2 as in PyTorch (decoupled for adamw, muon); for
    #                                    SGD the recipe's is 5e-4
    decay_bn_and_bias: bool = False    # also decay BatchNorm parameters and biases
    schedule: str = "onecycle"         # constant | step | cosine | onecycle | linear
    warmup_epochs: float = 0.5         # linear warm-up (cosine, onecycle, linear), in epochs
    step_milestones: str = "0.5,0.75"  # step decay at these fractions of the run
    step_gamma: float = 0.1            # step decay factor
    label_smoothing: float = 0.1
    clipnorm: float = 0.0              # gradient clipping by global norm; 0 = off
    ema: float = 0.0                   # EMA of the weights (momentum per step); 0 = off
    bias_lr_scale: float = 1.0         # LR multiplier of BatchNorm betas and biases
    zero_init_residual: bool = True    # last BN gamma of each block starts at 0
    whiten_stem: bool = True           # stem conv starts as frozen patch-whitening filters
    image_size: int | None = None      # image folders: N x N input; None = the most common size
    crop_flip: bool = True             # random crop + horizontal flip
    alternate_flip: bool = False       # flip each image in every other pass (airbench)
    crop: str = "pad"                  # pad: pad-and-crop (CIFAR) | resized: random
    #                                    resized crop (ImageNet recipe)
    crop_padding: int = 2              # pad crop: pixels of zero padding (max shift)
    crop_scale: str = "0.08,1"         # resized crop: share of the image area, low,high
    crop_ratio: str = "0.75,1.333"     # resized crop: aspect ratio, low,high
    eval_crop_ratio: float | None = None  # eval centre crop covers this share of the shorter
    #                                    side; None = 0.875 with the resized crop, else 1
    cache: str = "auto"                # decoded images: auto | memory | none | a folder path
    rotation: float = 0.0              # degrees
    color_jitter: float = 0.0
    erasing: float = 0.0               # random-erasing probability
    mixup: float = 0.0                 # Beta alpha
    cutmix: float = 0.0                # Beta alpha
    randaugment: int = 0               # ops per image
    augment_in_model: bool = False     # augment inside the model (on the accelerator);
    #                                    always so with the memory pipeline or under JAX
    pipeline: str = "auto"             # auto | tfdata | memory; auto = tfdata on the
    #                                    TensorFlow backend, memory on JAX
    validation_size: int = 5000        # images carved from train to pick best.keras
    #                                    (0: the last epoch); test is scored once
    max_train_images: int | None = None
    max_eval_images: int | None = None
    seed: int = 0
    precision: str = "auto"            # auto | float32 | bfloat16 | float16
    jit_compile: str = "auto"          # auto | on | off (XLA); auto = on for GPUs only
    steps_per_execution: int = 1
    strategy: str = "default"          # default | mirrored | multiworker (TensorFlow) |
    #                                    data-parallel (JAX: keras.distribution)
    coordinator: str | None = None     # JAX multi-host: HOST:PORT of process 0
    num_processes: int = 1             # JAX multi-host: processes in the run
    process_id: int = 0                # JAX multi-host: this process, 0..num_processes-1
    coordinator_timeout: float = 300.0  # seconds to wait for the other processes
    early_stopping: int = 0            # patience in epochs; 0 = off
    tta_flip: bool = True              # flip test-time augmentation for the test score
    #                                    (export_model.py puts it in the artifacts)
    tta_shift: int = 0                 # test score also averages the views shifted by
    #                                    +/- this many pixels (3x the passes; 0 = off)
    verbose: int = 1                   # Keras progress bar: 0 silent, 1 bar, 2 line/epoch

    def augment(self):
        return AugmentConfig(
            crop_flip=self.crop_flip, alternate_flip=self.alternate_flip, crop=self.crop,
            crop_padding=self.crop_padding,
            crop_scale=_pair(self.crop_scale, "crop_scale"),
            crop_ratio=_pair(self.crop_ratio, "crop_ratio"),
            rotation=self.rotation, color_jitter=self.color_jitter,
            erasing=self.erasing, mixup=self.mixup, cutmix=self.cutmix,
            randaugment=self.randaugment, in_model=augments_in_model(self))

    def validate(self):
        """Raise ``ValueError`` naming the first bad field, before any work."""
        checks = [
            ("model", self.model in MODELS or (self.model is None and hasattr(self, "weights")),
             f"one of {', '.join(MODELS)}"),
            ("stem", self.stem in STEMS or (self.stem is None and hasattr(self, "weights")),
             f"one of {', '.join(STEMS)}"),
            ("epochs", _is_int(self.epochs) and self.epochs >= 1, "an integer >= 1"),
            ("batch_size", _is_int(self.batch_size) and self.batch_size >= 1,
             "an integer >= 1"),
            ("optimizer", self.optimizer in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
            ("lr", self.lr > 0, "> 0"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("schedule", self.schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
            ("warmup_epochs", 0 <= self.warmup_epochs < self.epochs, "in [0, epochs)"),
            ("step_gamma", 0 < self.step_gamma <= 1, "in (0, 1]"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
            ("clipnorm", self.clipnorm >= 0, ">= 0"),
            ("ema", 0 <= self.ema < 1, "in [0, 1)"),
            ("bias_lr_scale", self.bias_lr_scale > 0, "> 0"),
            ("validation_size", self.validation_size is None or (
                _is_int(self.validation_size) and self.validation_size >= 0),
             "an integer >= 0, or None for a tenth of the training images"),
            ("max_train_images", self.max_train_images is None or self.max_train_images >= 1,
             ">= 1"),
            ("max_eval_images", self.max_eval_images is None or self.max_eval_images >= 1,
             ">= 1"),
            ("precision", self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
            ("jit_compile", self.jit_compile in ("auto", "on", "off"), "auto, on or off"),
            ("steps_per_execution", self.steps_per_execution >= 1, ">= 1"),
            ("strategy", self.strategy in STRATEGIES, f"one of {', '.join(STRATEGIES)}"),
            ("early_stopping", self.early_stopping >= 0, ">= 0"),
            ("tta_shift", _is_int(self.tta_shift) and 0 <= self.tta_shift <= MAX_TTA_SHIFT,
             f"an integer in 0..{MAX_TTA_SHIFT}"),
            ("image_size", self.image_size is None or (_is_int(self.image_size)
                                                         and self.image_size >= 8), ">= 8"),
            ("eval_crop_ratio", self.eval_crop_ratio is None or 0 < self.eval_crop_ratio <= 1,
             "in (0, 1]"),
            ("cache", bool(self.cache), "auto, memory, none or a folder path"),
        ]
        for field, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{field}: got {getattr(self, field)!r}; must be {allowed}")
        try:
            milestones = [float(m) for m in self.step_milestones.split(",")]
        except ValueError:
            milestones = [-1.0]
        if not all(0 < m < 1 for m in milestones):
            raise ValueError(f"step_milestones: got {self.step_milestones!r}; must be "
                             "comma-separated fractions of the run in (0, 1)")
        self.augment()  # validates the augmentation fields
        check_backend(self)
        if self.data_dir is not None and not os.path.isdir(self.data_dir):
            raise ValueError(f"data_dir: {self.data_dir!r} is not a directory (expected an "
                             "image folder root/train/<class>/*.jpg)")


def _pair(text, field):
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) != 2:
        raise ValueError(f"{field}: got {text!r}; must be two numbers 'low,high'")
    return values


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def fits_type(value, kind):
    """Whether a JSON value can be a field of type ``kind`` (an int is a float, a bool
    is no number; ``X | None`` also takes None)."""
    import typing

    return any((value is None and t is type(None))
               or (t is float and isinstance(value, (int, float)) and not isinstance(value, bool))
               or (t is int and _is_int(value))
               or (t in (str, bool) and isinstance(value, t))
               for t in typing.get_args(kind) or (kind,))


def tensorflow_available():
    """Whether TensorFlow can be imported here (GPU machines may have only JAX),
    without importing it (under JAX it would claim GPU memory)."""
    if "tensorflow" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        return False


def pipeline_of(config):
    """The input pipeline a run uses: "tfdata" or "memory" ("auto": by backend)."""
    if config.pipeline != "auto":
        return config.pipeline
    return "tfdata" if keras.backend.backend() == "tensorflow" else "memory"


def augments_in_model(config):
    """Whether the batched image augmentations run inside the model: when asked,
    with the memory pipeline (it has no augmentation of its own), and under JAX
    (in a tf.data map they would run on TensorFlow ops)."""
    return (config.augment_in_model or pipeline_of(config) == "memory"
            or keras.backend.backend() != "tensorflow")


# What the memory pipeline cannot do: these run per image in tf.data, or (rotation)
# are not jit-compatible inside the model.
NOT_IN_MEMORY = {"rotation": "--rotation", "randaugment": "--randaugment",
                 "mixup": "--mixup", "cutmix": "--cutmix"}


def check_backend(config):
    """Refuse, naming the flag, what this Keras backend (and machine) cannot run."""
    backend = keras.backend.backend()
    if backend not in BACKENDS:
        raise ValueError(f"KERAS_BACKEND: got {backend!r}; keras_resnet trains with "
                         f"{' or '.join(BACKENDS)} (on torch, Keras's jit_compile recompiles "
                         "at every step: see docs/backends.md)")
    checks = [
        ("pipeline", config.pipeline in PIPELINES, f"one of {', '.join(PIPELINES)}"),
        ("strategy", backend == "tensorflow" or config.strategy not in TF_STRATEGIES,
         ("default or data-parallel under JAX (mirrored and multiworker are tf.distribute: "
         "KERAS_BACKEND=tensorflow)")),
        ("strategy", backend == "jax" or config.strategy != "data-parallel",
         ("default, mirrored or multiworker under TensorFlow (data-parallel is "
         "keras.distribution: KERAS_BACKEND=jax)")),
        ("num_processes", _is_int(config.num_processes) and config.num_processes >= 1,
         "an integer >= 1"),
        ("process_id", _is_int(config.process_id)
         and 0 <= config.process_id < max(config.num_processes, 1),
         (f"an integer in 0..{config.num_processes - 1} (--num-processes "
         f"{config.num_processes})")),
        ("coordinator_timeout", config.coordinator_timeout > 0, "> 0 seconds"),
    ]
    for field, ok, allowed in checks:
        if not ok:
            raise ValueError(f"{field}: got {getattr(config, field)!r}; must be {allowed}")
    multi = config.coordinator is not None or config.num_processes > 1
    if multi:
        host, _, port = (config.coordinator or "").rpartition(":")
        if backend != "jax":
            raise ValueError("coordinator: multi-host runs through jax.distributed need "
                             "KERAS_BACKEND=jax (under TensorFlow use --strategy multiworker "
                             "and TF_CONFIG)")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"coordinator: got {config.coordinator!r}; must be HOST:PORT of "
                             "process 0, the same on every process")
        if config.num_processes < 2:
            raise ValueError(f"num_processes: got {config.num_processes}; a run with "
                             "--coordinator needs >= 2 processes")
        if config.strategy != "data-parallel":
            raise ValueError(f"strategy: got {config.strategy!r}; a multi-host run needs "
                             "--strategy data-parallel")
        if pipeline_of(config) != "memory":
            raise ValueError("pipeline: a multi-host run feeds each process's shard from "
                             "memory; use --pipeline memory")
    if pipeline_of(config) == "tfdata" and not tensorflow_available():
        raise ValueError("pipeline: tfdata needs TensorFlow, which is not installed here; "
                         "use --pipeline memory")
    if pipeline_of(config) == "memory":
        if config.crop == "resized" and config.crop_flip:
            raise ValueError("crop: the memory pipeline holds images at one size; the "
                             "resized crop needs --pipeline tfdata (or --crop pad)")
        for field, flag in NOT_IN_MEMORY.items():
            if getattr(config, field):
                raise ValueError(f"{field}: {flag} runs in the tf.data pipeline only; use "
                                 "--pipeline tfdata, or leave it at 0 with --pipeline memory")


def smoke_config(**overrides):
    """A tiny run for tests and CI: the smallest network (resnet10t, about 0.7x
    ResNet-18's time in such a run), few images, one epoch, small batches."""
    return dataclasses.replace(
        TrainConfig(model="resnet10t", epochs=1, batch_size=8, validation_size=16,
                    max_train_images=64, max_eval_images=16, verbose=0, warmup_epochs=0.0),
        **overrides)


def baseline_config(**overrides):
    """The plain baseline the recipe is measured against (issue #4)."""
    return dataclasses.replace(
        TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
                    decay_bn_and_bias=True, schedule="cosine", warmup_epochs=0.0,
                    label_smoothing=0.0, zero_init_residual=False, batch_size=128,
                    whiten_stem=False, tta_flip=False, crop_padding=4),
        **overrides)


# --------------------------------------------------------------------------- data


def eval_crop_ratio(config):
    """The eval centre crop: 0.875 of the shorter side with the resized crop, else all."""
    if config.eval_crop_ratio is not None:
        return config.eval_crop_ratio
    return 0.875 if config.crop == "resized" else 1.0


def folder_shard(config, strategy):
    """(count, index): this process's disjoint share of the training images, or None
    (all of them). tf.distribute shards a tfds source itself; an image folder, and
    every source under JAX, is sharded here."""
    if isinstance(strategy, JaxDevices):
        return strategy.shard()
    from keras_resnet.tf_strategy import worker_shard

    return worker_shard(strategy) if config.data_dir else None


def load_data(config, strategy=None, *, stats=True, image_size=None, with_test=True):
    """The splits ``config`` trains on; each multi-worker process reads its own shard."""
    if pipeline_of(config) == "memory":
        return arrays.load_memory_splits(
            config.dataset, data_dir=config.data_dir, tfds_data_dir=config.tfds_data_dir,
            validation_size=config.validation_size, max_train_images=config.max_train_images,
            max_eval_images=config.max_eval_images, seed=config.seed,
            image_size=image_size or config.image_size, eval_crop_ratio=eval_crop_ratio(config),
            stats=stats, shard=folder_shard(config, strategy), with_test=with_test)
    from keras_resnet import data as data_lib

    return data_lib.load_splits(
        config.dataset, data_dir=config.data_dir, tfds_data_dir=config.tfds_data_dir,
        validation_size=config.validation_size, max_train_images=config.max_train_images,
        max_eval_images=config.max_eval_images, seed=config.seed,
        image_size=image_size or config.image_size, cache=config.cache,
        resize_train=config.crop != "resized", eval_crop_ratio=eval_crop_ratio(config),
        stats=stats, shard=folder_shard(config, strategy), with_test=with_test)


# --------------------------------------------------------------------- model & optimiser


def augmenter_for(config, splits):
    """The in-model augmentation layers of a run, or None (augmented in tf.data)."""
    if not augments_in_model(config):
        return None
    return build_augmenter(config.augment(), splits.image_size, config.seed)


def classifier_for(config, splits):
    """The model ``config`` trains on ``splits``: preprocessing inside, logits out."""
    augmenter = augmenter_for(config, splits)
    return build_classifier(config.model, image_size=splits.image_size,
                            num_classes=splits.num_classes, mean=splits.mean, std=splits.std,
                            augmenter=augmenter, stem=config.stem,
                            zero_init_residual=config.zero_init_residual)


def first_images(feed, count):
    """About ``count`` images from the first batches of a training feed (tf.data or a
    ``BatchFeed``), as one NumPy array."""
    if isinstance(feed, arrays.BatchFeed):
        batches = (feed[i][0] for i in range(len(feed)))
    else:
        batches = (x for x, _ in feed.as_numpy_iterator())
    images, total = [], 0
    for batch in batches:
        images.append(np.asarray(batch))
        total += len(batch)
        if total >= count:
            break
    return np.concatenate(images)[:count]


def whiten_stem_from(config, model, train_data, splits):
    """``whiten_stem``: the stem conv starts as frozen patch-whitening filters of the
    first training images. Single-process runs only: each process of a multi-host run
    sees other images, and the model must start the same on all of them."""
    if not config.whiten_stem:
        return
    if config.strategy == "multiworker" or config.num_processes > 1:
        print("whiten_stem: skipped (several processes); the stem keeps its random start")
        return
    images = first_images(train_data, WHITEN_IMAGES)
    set_filters = whitening.whiten_stem(model, images, splits.mean, splits.std)
    print(f"whiten_stem: {set_filters} of the stem's filters whiten the patches of "
          f"{len(images)} images (frozen)")


def _no_decay(variable):
    """BatchNorm parameters and biases: no weight decay unless asked."""
    return variable.path.endswith(("/gamma", "/beta", "/bias"))


def make_optimizer(config, schedule, model):
    """The optimiser; weight decay as intended for each kind.

    For SGD / RMSprop / Adam it is PyTorch-style L2 (``wd * w`` added to the
    gradient, so momentum carries it): Keras's ``weight_decay`` argument is
    decoupled, which for SGD with momentum is ~10x weaker at the same value.
    AdamW uses Keras's decoupled decay, which is what AdamW means. ``ema`` is
    Keras's own weight averaging (``use_ema``); ``bias_lr_scale`` multiplies the
    LR of BatchNorm betas and biases.
    """
    skip = [] if config.decay_bn_and_bias else [v for v in model.trainable_weights
                                                 if _no_decay(v)]
    decayed = [v for v in model.trainable_weights if not any(v is s for s in skip)]
    extra = {"global_clipnorm": config.clipnorm} if config.clipnorm else {}
    if config.ema:
        extra.update(use_ema=True, ema_momentum=config.ema)
    decoupled = config.optimizer in ("adamw", "muon")
    if config.weight_decay and not decoupled:
        for v in decayed:
            v.regularizer = keras.regularizers.L2(config.weight_decay / 2)
    if config.optimizer == "adamw":
        opt = keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay, **extra)
    elif config.optimizer == "muon":
        low = keras.config.dtype_policy().compute_dtype == "bfloat16"
        opt = ConvMuon(schedule, weight_decay=config.weight_decay,
                       adam_weight_decay=config.weight_decay, momentum=config.momentum,
                       exclude_layers=list(HEAD_LAYERS),
                       newton_schulz_dtype="bfloat16" if low else "float32", **extra)
    elif config.optimizer in ("sgd", "nesterov"):
        opt = keras.optimizers.SGD(schedule, momentum=config.momentum,
                                   nesterov=config.optimizer == "nesterov", **extra)
    elif config.optimizer == "rmsprop":
        opt = keras.optimizers.RMSprop(schedule, momentum=config.momentum, **extra)
    else:
        opt = keras.optimizers.Adam(schedule, **extra)
    if decoupled:
        opt.exclude_from_weight_decay(var_list=skip)
    if config.bias_lr_scale != 1:
        scale_lr(opt, lambda v: config.bias_lr_scale if _path(v).endswith(("/beta", "/bias"))
                 else None)
    return opt


@keras.saving.register_keras_serializable("keras_resnet")
class ConvMuon(keras.optimizers.Muon):
    """Keras's Muon, which orthogonalises the momentum of 2-D kernels only (a conv kernel
    gets its AdamW step), extended to conv kernels: each (kh, kw, in, out) kernel is
    flattened to a (kh * kw * in, out) matrix for the Newton-Schulz iteration and the
    update's scale, as Muon's reference does for CNNs (airbench); Keras's Muon step
    does the rest. BatchNorm parameters, biases and the ``exclude_layers`` (the
    classifier) keep the AdamW step.

    ``newton_schulz_dtype`` is the dtype the iteration runs in: "bfloat16", as
    Muon's reference runs it, cuts its cost where bfloat16 matmuls are native
    (``make_optimizer`` picks it under the mixed_bfloat16 policy); the update
    is applied in the variable's dtype.
    """

    def __init__(self, *args, newton_schulz_dtype="float32", **kwargs):
        super().__init__(*args, **kwargs)
        self.newton_schulz_dtype = newton_schulz_dtype

    def get_config(self):
        return {**super().get_config(), "newton_schulz_dtype": self.newton_schulz_dtype}

    def _should_use_adamw(self, variable):
        if len(variable.shape) == 4:
            return any(re.search(k, variable.path) for k in self.exclude_layers)
        return super()._should_use_adamw(variable)

    def zeropower_via_newtonschulz5(self, x, steps):
        def iterate(m):
            low = keras.ops.cast(m, self.newton_schulz_dtype)
            out = super(ConvMuon, self).zeropower_via_newtonschulz5(low, steps)
            return keras.ops.cast(out, m.dtype)

        return _as_matrix(x, iterate)

    def lr_adjust(self, x):
        return _as_matrix(x, super().lr_adjust)


def _as_matrix(x, fn):
    """``fn`` of a conv kernel (kh, kw, in, out) seen as a (kh * kw * in, out) matrix."""
    if len(x.shape) != 4:
        return fn(x)
    return keras.ops.reshape(fn(keras.ops.reshape(x, (-1, x.shape[-1]))), x.shape)


def _path(variable):
    """A Keras variable's path; inside ``update_step`` on TensorFlow the variable is the
    tf.Variable, whose name is the path plus ":0"."""
    return getattr(variable, "path", None) or variable.name.split(":")[0]


def scale_lr(optimizer, factor):
    """Multiply each variable's learning rate by ``factor(variable)`` (None: unscaled),
    as PyTorch's parameter groups do.

    Keras optimisers have one learning rate; each applies it per variable in
    ``update_step(gradient, variable, learning_rate)``, so wrapping that method
    of this instance scales it per variable.
    """
    base = optimizer.update_step

    def update_step(gradient, variable, learning_rate):
        f = factor(variable)
        if f is not None:
            learning_rate = learning_rate * keras.ops.cast(f, learning_rate.dtype)
        return base(gradient, variable, learning_rate)

    optimizer.update_step = update_step
    return optimizer


def build_optimizer(model):
    """Create the compiled model's optimiser variables now. Keras's TensorFlow trainer
    (without a tf.distribute strategy) leaves that to the first traced train step, and a
    tf.function that creates variables on its first call is traced twice: building here
    saves one trace of the whole step (about 4 s for ResNet18 on a 2-core CPU)."""
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def make_schedule(config, steps_per_epoch, lr):
    """The LR schedule over ``config.epochs`` (a function of the optimiser step).

    "cosine" warms up linearly from 0 and "onecycle" from ``lr * ONE_CYCLE_START``,
    both then cosine down to 0: Keras's ``CosineDecay`` with
    ``warmup_target``.
    """
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    if config.schedule == "constant":
        return lr
    if config.schedule == "step":
        bounds = [int(float(m) * total) for m in config.step_milestones.split(",")]
        values = [lr * config.step_gamma ** i for i in range(len(bounds) + 1)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(bounds, values)
    if config.schedule == "linear":
        return Triangular(lr, total, warmup)
    start = lr * ONE_CYCLE_START if config.schedule == "onecycle" else 0.0
    return keras.optimizers.schedules.CosineDecay(
        start, total - warmup, warmup_target=lr, warmup_steps=warmup)


@keras.saving.register_keras_serializable("keras_resnet")
class Triangular(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from ``peak * ONE_CYCLE_START`` to ``peak`` over ``warmup_steps``,
    then linear decay to 0 at ``total_steps``: the "linear" schedule, which short
    budgets favour over cosine (Li et al., "Budgeted training", 2020). Keras's
    ``PolynomialDecay`` has no warm-up and ``CosineDecay``'s decay is a cosine, so
    this is written here.
    """

    def __init__(self, peak, total_steps, warmup_steps):
        self.peak, self.total_steps, self.warmup_steps = peak, total_steps, warmup_steps

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        start = self.peak * ONE_CYCLE_START
        up = (start + (self.peak - start) * step / self.warmup_steps if self.warmup_steps
              else self.peak)
        down = self.peak * (self.total_steps - step) / max(self.total_steps - self.warmup_steps, 1)
        return keras.ops.clip(keras.ops.minimum(up, down), 0.0, self.peak)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps}


@keras.saving.register_keras_serializable("keras_resnet")
class OneCycle(keras.optimizers.schedules.CosineDecay):
    """Loads run files written by keras_resnet 0.1, whose optimiser saved this
    schedule by name; it is the same curve as ``make_schedule``'s "onecycle"."""

    def __init__(self, peak, total_steps, warmup_steps):
        super().__init__(peak * ONE_CYCLE_START, total_steps - warmup_steps, warmup_target=peak,
                         warmup_steps=warmup_steps)
        self.peak, self.total_steps = peak, total_steps

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps}


def resolve_precision(precision):
    """The Keras dtype policy for ``--precision``.

    'auto' picks mixed bfloat16 / float16 on a GPU (by compute capability),
    mixed bfloat16 on a CPU with native bfloat16 arithmetic and float32 on
    other CPUs (scripts/benchmark_training.py measures the choice).
    """
    if precision != "auto":
        return {"float32": "float32", "bfloat16": "mixed_bfloat16",
                "float16": "mixed_float16"}[precision]
    major = gpu_capability()
    if major is None:  # XLA on CPU (JAX) has no fast bfloat16 path: float32 there
        tf_cpu = keras.backend.backend() == "tensorflow"
        return "mixed_bfloat16" if tf_cpu and cpu_has_bfloat16() else "float32"
    return "mixed_bfloat16" if major >= 8 else "mixed_float16"


def gpu_capability():
    """The compute capability major of the first GPU (8 = Ampere), None without one."""
    if keras.backend.backend() == "jax":
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        if not gpus:
            return None
        return int(str(getattr(gpus[0], "compute_capability", "0")).split(".")[0])
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    return tf.config.experimental.get_device_details(gpus[0]).get("compute_capability",
                                                                  (0, 0))[0]


def cpu_has_bfloat16(cpuinfo="/proc/cpuinfo"):
    """Whether oneDNN runs bfloat16 natively here: an x86 CPU with AVX512-BF16 or AMX.

    TensorFlow has no public API for CPU features, so the Linux flags are read;
    elsewhere, or with oneDNN switched off, the answer is no.
    """
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0":
        return False
    try:
        with open(cpuinfo) as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


class JaxDevices:
    """What training asks of a strategy, under JAX: the replicas, this process's
    share of the data, and a scope. ``data-parallel`` is Keras's
    ``DataParallel`` over every device of every process (each batch split along
    its first axis, weights replicated); else Keras's default placement."""

    def __init__(self, config):
        import jax

        if config.num_processes > 1:
            join_processes(config)
        self.distribution = None
        if config.strategy == "data-parallel":
            # Each process feeds its own shard (folder_shard): no auto-sharding.
            self.distribution = keras.distribution.DataParallel(
                devices=keras.distribution.list_devices(), auto_shard_dataset=False)
        self.num_replicas_in_sync = len(jax.devices()) if self.distribution else 1
        self.num_processes, self.process_id = jax.process_count(), jax.process_index()

    def scope(self):
        return self.distribution.scope() if self.distribution else contextlib.nullcontext()

    def shard(self):
        return (self.num_processes, self.process_id) if self.num_processes > 1 else None


def join_processes(config):
    """Join a multi-host JAX run (``jax.distributed``; process 0 serves the
    coordinator). Collectives on CPU go through gloo (JAX's default).

    JAX ends the process (a C++ abort, no exception) when it cannot reach the
    coordinator, so processes other than 0 first wait for its port to accept a
    connection, up to ``coordinator_timeout``, and stop with a message if it never does.
    """
    import jax

    if config.process_id != 0:
        wait_for_port(config.coordinator, config.coordinator_timeout,
                      f"process {config.process_id} of {config.num_processes}")
    try:
        jax.distributed.initialize(config.coordinator, config.num_processes, config.process_id,
                                   initialization_timeout=max(1, round(
                                       config.coordinator_timeout)))
    except Exception as e:  # noqa: BLE001 (XlaRuntimeError, RuntimeError, ValueError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"coordinator: process {config.process_id} of {config.num_processes} could not "
            f"join the run at {config.coordinator} ({first[:300]}); give every process the "
            "same --coordinator and --num-processes") from None


def wait_for_port(address, timeout, who):
    """Return once HOST:PORT accepts a TCP connection; ValueError after ``timeout`` s."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(2.0, timeout)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ValueError(
                    f"coordinator: {who} found nothing answering at {address} within "
                    f"{timeout:g} s ({e.strerror or e}); start process 0 (it serves the "
                    "coordinator) with the same --coordinator, or raise "
                    "--coordinator-timeout") from None
            time.sleep(0.5)


def make_strategy(config):
    """The devices a run trains on: tf.distribute under TensorFlow, keras.distribution
    under JAX."""
    if keras.backend.backend() == "jax":
        return JaxDevices(config)
    from keras_resnet.tf_strategy import make_strategy as tf_strategy

    return tf_strategy(config.strategy)


def uses_xla(config):
    """``--jit-compile``: auto = on with a GPU, and always under JAX (without jit, JAX
    runs op by op: XLA is its only fast path); off on a CPU under TensorFlow."""
    return config.jit_compile == "on" or (config.jit_compile == "auto" and (
        keras.backend.backend() == "jax" or gpu_capability() is not None))


def is_chief(strategy):
    """Whether this process writes the run's files (process 0 of a multi-host run)."""
    return getattr(strategy, "process_id", 0) == 0


# --------------------------------------------------------------------- fine-tuning

MODES = ("linear", "top", "full")
NUM_STAGES = 4
HEAD_LAYERS = ("predictions",)
NOT_BACKBONE = ("predictions", "normalize", "aug_", "augment")  # layer-name prefixes


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    """Transfer learning from pretrained weights to an image folder.

    Defaults: the ImageNet fine-tuning recipe (random resized crop, eval centre
    crop 0.875, cosine schedule, a lower LR for the backbone).
    """

    weights: str = "imagenet"          # imagenet | .pth / .safetensors | .keras / run dir
    model: str | None = None           # None = the network of the weights' run, else resnet18
    mode: str = "full"                 # linear: head only | top: last stages + head | full
    unfreeze_stages: int = 1           # mode top: how many of the 4 stages train
    backbone_lr_scale: float = 0.1     # backbone LR = this x the head's (top, full)
    head_epochs: int = 0               # full / top: epochs that train the head alone first
    stem: str | None = None            # None = the stem of the weights
    output_dir: str = "runs/finetune"
    epochs: int = 10
    optimizer: str = "nesterov"        # the measured fine-tuning recipe (docs/transfer.md)
    lr: float = 0.02                   # head's peak LR per 128 images
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    zero_init_residual: bool = False
    whiten_stem: bool = False          # the stem comes with the pretrained weights
    tta_flip: bool = False
    crop: str = "resized"
    validation_size: int | None = None  # None = a tenth of the training images

    def validate(self):
        super().validate()
        checks = [
            ("mode", self.mode in MODES, f"one of {', '.join(MODES)}"),
            ("unfreeze_stages", _is_int(self.unfreeze_stages)
             and 1 <= self.unfreeze_stages <= NUM_STAGES, f"an integer in 1..{NUM_STAGES}"),
            ("backbone_lr_scale", 0 < self.backbone_lr_scale <= 1, "in (0, 1]"),
            ("head_epochs", _is_int(self.head_epochs) and 0 <= self.head_epochs < self.epochs,
             "an integer in [0, epochs)"),
            ("weights", bool(self.weights), "imagenet or a weights file"),
        ]
        for field, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{field}: got {getattr(self, field)!r}; must be {allowed}")
        if self.data_dir is None:
            raise ValueError("data_dir: fine-tuning needs an image folder "
                             "root/train/<class>/*.jpg")
        if self.weights != "imagenet":
            source_path(self.weights)  # exists and is a supported kind


def source_path(weights):
    """The file behind ``--weights``: a run directory means its ``best.keras``."""
    path = os.path.join(weights, "best.keras") if os.path.isdir(weights) else weights
    if not os.path.isfile(path):
        raise ValueError(f"weights: {weights!r} is neither 'imagenet', a weights file nor a "
                         "run directory holding best.keras")
    if not path.endswith((".keras", *weights_lib.TORCH_SUFFIXES, ".safetensors")):
        raise ValueError(f"weights: {weights!r} must be 'imagenet', a PyTorch checkpoint "
                         "(.pth, .pt, .bin, .safetensors) or a keras_resnet .keras model")
    return path


def network_of(weights):
    """The name in MODELS of the network behind ``--weights``: what the config.json of
    a keras_resnet run says (``weights`` its directory or a .keras file in it), else
    resnet18 (ImageNet and PyTorch checkpoints)."""
    if weights != "imagenet" and source_path(weights).endswith(".keras"):
        run = weights if os.path.isdir(weights) else os.path.dirname(weights)
        model = (read_json_object(os.path.join(run, "config.json")) or {}).get("model")
        if model in MODELS:
            return model
    return "resnet18"


def infer_stem(model):
    """The stem a keras_resnet model was built with, from its layer names."""
    names = {layer.name for layer in model.layers}
    if "stem_conv3" in names:  # the tiered stem's first conv is narrower (24 of 32)
        narrow = model.get_layer("stem_conv1").filters < model.get_layer("stem_conv2").filters
        return "deep_tiered" if narrow else "deep"
    return "imagenet" if "stem_pool" in names else "cifar"


def pretrained_source(config):
    """(model holding the pretrained weights, its preprocessing, its stem)."""
    if config.weights != "imagenet" and source_path(config.weights).endswith(".keras"):
        path = source_path(config.weights)
        try:
            source = keras.saving.load_model(path, compile=False)
        except (ValueError, OSError, KeyError, TypeError) as e:
            raise ValueError(f"weights: {path!r} is not a Keras model file ({e})") from None
        try:
            norm = source.get_layer("normalize")
        except ValueError:
            raise ValueError(f"weights: {path!r} is not a keras_resnet classifier (no "
                             "'normalize' layer)") from None
        pre = {"mean": tuple(float(v) for v in np.ravel(norm.mean)),
               "std": tuple(float(v) for v in np.sqrt(np.ravel(norm.variance))),
               "image_size": int(source.input_shape[1]), "crop_ratio": 1.0}
        stem = infer_stem(source)
        # The backbone of config.model, checked against the file now (a mismatch
        # names its first layer before anything is written).
        backbone = build_model(config.model, stem=stem, include_top=False,
                               input_shape=source.input_shape[1:])
        try:
            weights_lib.copy_weights(source, backbone, skip=NOT_BACKBONE)
        except ValueError as e:
            raise ValueError(f"{e}: --model {config.model} is not the network in {path!r}; "
                             "pass the --model it was trained with") from None
        return backbone, pre, stem
    stem = config.stem or "imagenet"
    source = build_model(config.model, stem=stem, include_top=False,
                         input_shape=(64, 64, 3) if stem != "cifar" else (32, 32, 3))
    weights = config.weights if config.weights == "imagenet" else source_path(config.weights)
    weights_lib.load_weights(source, weights, arch=config.model)
    return source, weights_lib.preprocessing_for(weights), stem


def set_trainable(model, mode, unfreeze_stages=1):
    """Freeze for a transfer mode; a frozen BatchNorm runs in inference mode in Keras
    (its moving statistics stay as they are).

    linear: only the head trains; top: the last ``unfreeze_stages`` stages and
    the head; full: everything.
    """
    first = {"linear": NUM_STAGES + 1, "top": NUM_STAGES + 1 - unfreeze_stages,
             "full": 0}[mode]
    for layer in model.layers:
        if layer.name.startswith(HEAD_LAYERS):
            layer.trainable = True
        elif layer.name.startswith("stage"):
            layer.trainable = int(layer.name[len("stage")]) >= first
        elif layer.name.startswith("post_"):  # pre-activation models: after stage 4
            layer.trainable = first <= NUM_STAGES
        else:  # stem, normalisation, augmentation
            layer.trainable = mode == "full"
    return model


def scale_backbone_lr(optimizer, scale, head_steps=0):
    """Give the backbone ``scale`` x the head's learning rate (0 in the first
    ``head_steps``)."""
    def factor(variable):
        if any(part.startswith(HEAD_LAYERS) for part in _path(variable).split("/")):
            return None
        if head_steps:
            return keras.ops.where(optimizer.iterations >= head_steps, scale, 0.0)
        return scale

    return scale_lr(optimizer, factor)


def finetune_classifier(config, splits, source=None):
    """A classifier for ``splits`` with ``config.weights`` in its backbone, the
    weights' preprocessing inside, a fresh head, and the mode's layers frozen."""
    source, pre, stem = source or pretrained_source(config)
    augmenter = augmenter_for(config, splits)
    model = build_classifier(config.model, image_size=splits.image_size,
                             num_classes=splits.num_classes, mean=pre["mean"],
                             std=pre["std"], augmenter=augmenter, stem=stem)
    weights_lib.copy_weights(source, model, skip=NOT_BACKBONE)
    return set_trainable(model, config.mode, config.unfreeze_stages)


# --------------------------------------------------------------------------- run dir


def check_output_dir(out, name="output_dir"):
    """Refuse an output directory that cannot be created or written, touching nothing:
    the probe file goes into the nearest folder that exists, and is removed."""
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    try:
        if not os.path.isdir(parent):
            raise NotADirectoryError(f"{parent!r} is a file")
        with tempfile.NamedTemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ValueError(f"{name}: cannot write to {out!r}: {e.strerror or e}") from None


def prepare_run_dir(config):
    """Create / check the run directory; refuse a resume with another config; clear
    what a killed run left half-written."""
    out = config.output_dir
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValueError(f"output_dir: cannot write to {out!r}: {e.strerror}") from None
    path = os.path.join(out, "config.json")
    resuming = os.path.exists(os.path.join(out, "backup"))
    if os.path.exists(path):
        saved = read_json_object(path)
        if saved is None:
            if resuming:  # it says which config the backup belongs to: do not guess
                raise ValueError(f"output_dir: {path!r} is not a readable config (edited or "
                                 "damaged); restore it, or start over with a new --output-dir")
            saved = {}
        differ = {k: (saved.get(k), v) for k, v in dataclasses.asdict(config).items()
                  if k not in RESUMABLE_FIELDS and saved.get(k) != v}
        if differ and resuming:
            lines = ", ".join(f"{k}: run has {a!r}, asked {b!r}" for k, (a, b) in differ.items())
            raise ValueError(f"output_dir: {out!r} holds an unfinished run with another "
                             f"config ({lines}); use a new --output-dir or the same flags")
    write_json(path, dataclasses.asdict(config))
    atomic.remove_temp_files(out)  # a checkpoint save cut off by a kill
    return resuming


def read_json_object(path):
    """The JSON object in ``path``; None when it cannot be read or is no object."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def write_json(path, obj):
    """Write JSON atomically (temporary file, then rename)."""
    atomic.write(path, json.dumps(obj, indent=2))


def _trim_history(path, epochs_done):
    """Drop history rows of epochs the backup does not hold (killed mid-write)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = list(csv.reader(f))
    keep = rows[:1] + [r for r in rows[1:] if r and int(r[0]) < epochs_done]
    # Whole or not at all: the other processes of a multi-host run read it meanwhile.
    with atomic.replacing(path) as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(keep)


def _backup_readable(weights, metadata):
    """Whether a backup (weights file and its metadata) reads back whole."""
    import h5py

    def read(_, obj):
        if isinstance(obj, h5py.Dataset):
            obj[()]

    try:
        with h5py.File(weights, "r") as f:
            f.visititems(read)
        with open(metadata) as f:
            int(json.load(f)["epoch"])
    except Exception:  # noqa: BLE001 (h5py raises OSError, KeyError, RuntimeError, ...)
        return False
    return True


def recover_backup(backup_dir):
    """Make the backup that a resume loads a whole one.

    A kill or a full disk during a save can leave ``latest.weights.h5`` damaged;
    BackupAndRestore's ``double_checkpoint`` keeps the previous one as ``.bkp``,
    which then takes its place (and ``history.csv`` is trimmed to match).

    Raises:
        ValueError: no whole backup is left; the message says how to start over.
    """
    weights = os.path.join(backup_dir, "latest.weights.h5")
    metadata = os.path.join(backup_dir, "training_metadata.json")
    if not os.path.exists(weights) or _backup_readable(weights, metadata):
        return
    if not any(os.path.exists(p + ".bkp") for p in (weights, metadata)):
        # The first backup was cut off mid-write: there is no earlier epoch to lose.
        shutil.rmtree(backup_dir)
        print(f"resume: the first backup in {backup_dir} was cut off mid-write; starting "
              "the run over")
        return
    if _backup_readable(weights + ".bkp", metadata + ".bkp"):
        for path in (weights, metadata):
            with atomic.replacing(path) as tmp:
                shutil.copyfile(path + ".bkp", tmp)
        print(f"resume: the last backup in {backup_dir} is damaged; resuming from the one "
              f"before it (after epoch {_backup_epoch(backup_dir)})")
        return
    raise ValueError(f"output_dir: the backup in {backup_dir!r} is damaged and no earlier "
                     f"copy is whole; to start this run over, remove that folder "
                     f"(rm -r {backup_dir}) or pass a new --output-dir")


def _history_seconds(path):
    """The training seconds the last row of history.csv reached (0 for a new run)."""
    if not os.path.exists(path):
        return 0.0
    seconds = read_history(path).get("seconds", [])
    return seconds[-1] if seconds and np.isfinite(seconds[-1]) else 0.0


def _backup_epoch(backup_dir):
    meta = os.path.join(backup_dir, "training_metadata.json")
    if not os.path.exists(meta):
        return 0
    with open(meta) as f:
        return int(json.load(f).get("epoch", 0))  # epochs completed


# ------------------------------------------------------------------------------ train


def train(config, *, score_test=True):
    """Train, keep the best checkpoint, score the test set once; returns the report.

    ``score_test=False`` (a search trial) leaves the test split unread; the report
    then holds ``best_val_accuracy``. The global dtype policy (and, under JAX,
    the distribution) is set for the run and restored afterwards. In a
    multi-host run only process 0 writes the run's files and scores the test
    set; the others return ``{"process_id": I}``.
    """
    config.validate()
    if config.model is None:  # fine-tuning: the network of its weights
        config = dataclasses.replace(config, model=network_of(config.weights))
    check_output_dir(config.output_dir)
    # First backend call: multi-worker collectives (TF) and jax.distributed must be
    # set up before anything else runs.
    strategy = make_strategy(config)
    if tensorflow_available():  # Keras seeds TensorFlow too: it imports it under JAX
        startup.import_tensorflow()
    keras.utils.set_random_seed(config.seed)
    # Weights and data are checked before the run directory is touched: bad input
    # leaves nothing behind.
    source = None
    if isinstance(config, FinetuneConfig):  # pretrained weights bring their preprocessing
        source = pretrained_source(config)
        splits = load_data(config, strategy, stats=False, with_test=score_test,
                           image_size=config.image_size or source[1]["image_size"])
    else:
        splits = load_data(config, strategy, with_test=score_test)
    steps_for(config, strategy, splits)  # a batch larger than the data is refused here
    chief = is_chief(strategy)
    with locking.hold(config.output_dir) if chief else contextlib.nullcontext():
        # Process 0 owns the run directory; the others only read its backup.
        resuming = (prepare_run_dir(config) if chief else
                    os.path.exists(os.path.join(config.output_dir, "backup")))
        policy = keras.config.dtype_policy()
        try:
            keras.config.set_dtype_policy(resolve_precision(config.precision))
            with strategy.scope() if isinstance(strategy, JaxDevices) else \
                    contextlib.nullcontext():
                model, fitted = _fit(config, strategy, resuming, splits, source)
            if not chief:
                return {"process_id": strategy.process_id}
            return _report(config, strategy, splits, model, fitted)
        finally:
            keras.config.set_dtype_policy(policy)


def steps_for(config, strategy, splits):
    """Training steps per epoch (global batches of the training split, all workers)."""
    global_batch = config.batch_size * strategy.num_replicas_in_sync
    shard = folder_shard(config, strategy)
    steps = splits.num_train * (shard[0] if shard else 1) // global_batch
    if steps < 1:
        raise ValueError(f"batch_size: global batch {global_batch} is larger than the "
                         f"{splits.num_train} training images")
    return steps


def make_feeds(config, strategy, splits, global_batch):
    """(training data, validation data) for ``fit``: tf.data datasets, or ``BatchFeed``s
    of the arrays in memory (each process feeds its share of the global batch)."""
    if pipeline_of(config) == "memory":
        batch = global_batch // getattr(strategy, "num_processes", 1)
        train = arrays.BatchFeed(*splits.train, batch, splits.num_classes, shuffle=True,
                                 seed=config.seed, alternate_flip=config.alternate_flip)
        val = (arrays.BatchFeed(*splits.validation, batch, splits.num_classes)
               if splits.validation is not None else None)
        return train, val
    import tensorflow as tf

    from keras_resnet import data as data_lib

    train_ds = data_lib.make_train_dataset(
        splits.train, global_batch, splits.num_classes, augment=config.augment(),
        seed=config.seed, image_size=splits.image_size,
        shuffle_buffer=0 if splits.pre_shuffled else 50_000)
    if folder_shard(config, strategy):
        # Each worker already reads its own files: no second sharding by tf.distribute.
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.OFF)
        train_ds = train_ds.with_options(options)
    val_ds = (data_lib.make_eval_dataset(splits.validation, global_batch, splits.num_classes)
              if splits.validation is not None else None)
    # repeat + steps_per_epoch: a folder pipeline drops files that do not decode, so its
    # length is not known up front (and an epoch stays the same number of steps).
    return train_ds.repeat(), val_ds


class RestoreOnly(keras.callbacks.BackupAndRestore):
    """Processes other than 0 of a multi-host run: restore the backup process 0
    writes (the run directory is on a file system every host sees), never write."""

    def on_epoch_end(self, epoch, logs=None):
        pass

    def on_train_batch_end(self, batch, logs=None):
        pass


class AtomicCheckpoint(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint that writes a temporary file beside the target, then renames it.
    Why: Keras writes the ``.keras`` zip in place, so a kill or a full disk during a
    save would leave a cut-off ``best.keras`` that scoring, ``--weights`` and export
    could not open; this way the previous checkpoint stays whole until the new one is."""

    def _save_model(self, epoch, batch, logs):
        target = self.filepath
        self.filepath = atomic.temp_path(target, suffix=".keras")
        try:
            super()._save_model(epoch, batch, logs)
            if os.path.exists(self.filepath):  # save_best_only skips some epochs
                os.replace(self.filepath, target)
        finally:
            with contextlib.suppress(OSError):
                os.remove(self.filepath)
            self.filepath = target


class LastFiniteCheckpoint(AtomicCheckpoint):
    """``best.keras`` of a run with no validation split: each epoch whose mean loss
    is finite overwrites it, so it ends as the last epoch the schedule reached.
    Why not ModelCheckpoint's ``save_best_only``: with nothing held out, training
    accuracy is all it could rank by, and that ranks fit, not generalisation (the
    LR schedule is built to end at the last epoch); without a guard, an epoch
    that TerminateOnNaN cut short would overwrite the last good weights."""

    def on_epoch_end(self, epoch, logs=None):
        if np.isfinite((logs or {}).get("loss", np.nan)):
            super().on_epoch_end(epoch, logs)


def early_stopping_state(values, patience):
    """(best, epochs since it, whether it stopped) after ``values`` (a max-monitored
    metric per epoch), counted as Keras's EarlyStopping counts them."""
    best, wait, stopped = None, 0, False
    for epoch, value in enumerate(values):
        wait += 1
        if np.isfinite(value) and (best is None or value > best):
            best, wait = value, 0
        elif wait >= patience and epoch > 0:
            stopped = True
    return best, wait, stopped


class ResumedEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping that goes on from the epochs a resumed run already has. Keras's
    starts counting afresh at each ``fit``, so a run resumed after a crash trained up
    to ``patience`` epochs more than one that was never stopped."""

    def __init__(self, monitor, patience, previous):
        super().__init__(monitor, mode="max", patience=patience)
        self.previous = previous

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.best, self.wait, _ = early_stopping_state(self.previous, self.patience)


class OffMesh(keras.callbacks.Callback):
    """Runs a callback's hooks with no ``keras.distribution`` set (multi-host runs).

    Why: Keras's weight saver and loader build a throwaway optimiser, whose
    variables, under a multi-process distribution, are laid out over every
    process's devices, and JAX then waits for the other processes to create the
    same; process 0 saving alone would fail or hang. Outside the distribution
    they are local; the model's own variables keep their layout.
    """

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def set_model(self, model):
        super().set_model(model)
        self.inner.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        self.inner.set_params(params)


def _off_mesh(hook):
    def forward(self, *args, **kwargs):
        previous = keras.distribution.distribution()
        keras.distribution.set_distribution(None)
        try:
            return getattr(self.inner, hook)(*args, **kwargs)
        finally:
            keras.distribution.set_distribution(previous)
    return forward


for _hook in ("on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end",
              "on_train_batch_begin", "on_train_batch_end"):
    setattr(OffMesh, _hook, _off_mesh(_hook))


def _fit(config, strategy, resuming, splits, source):
    """Build, compile and fit; returns (model, facts for the report)."""
    out = config.output_dir
    chief = is_chief(strategy)
    keras.utils.set_random_seed(config.seed)
    jit = uses_xla(config)
    if splits.report and chief:
        print(f"data: {json.dumps(splits.report)}")
    if chief:
        with open(os.path.join(out, "labels.txt"), "w") as f:
            f.writelines(f"{name}\n" for name in splits.class_names)
        # How evaluation resized and cropped: predict.py and export do the same.
        write_json(os.path.join(out, "preprocessing.json"),
                   {"crop_ratio": eval_crop_ratio(config)})
    global_batch = config.batch_size * strategy.num_replicas_in_sync
    steps_per_epoch = steps_for(config, strategy, splits)
    lr = config.lr * global_batch / LR_REFERENCE_BATCH
    train_data, val_data = make_feeds(config, strategy, splits, global_batch)

    with strategy.scope():
        if source is None:
            model = classifier_for(config, splits)
        else:
            model = finetune_classifier(config, splits, source)
        if source is None:
            whiten_stem_from(config, model, train_data, splits)
        optimizer = make_optimizer(config, make_schedule(config, steps_per_epoch, lr), model)
        if source is not None and config.mode != "linear":
            scale_backbone_lr(optimizer, config.backbone_lr_scale,
                              config.head_epochs * steps_per_epoch)
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.CategoricalCrossentropy(
                from_logits=True, label_smoothing=config.label_smoothing),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"),
                     keras.metrics.TopKCategoricalAccuracy(5, name="top5")],
            jit_compile=jit, steps_per_execution=config.steps_per_execution)
        build_optimizer(model)

    monitor = "val_accuracy" if val_data is not None else "accuracy"
    nan = {}

    def note_nan(batch, logs):
        if "epoch" not in nan and not np.isfinite((logs or {}).get("loss", 0.0)):
            nan["epoch"] = nan.get("current", 0)

    backup = os.path.join(out, "backup")
    history_csv = os.path.join(out, "history.csv")
    if resuming and chief:
        recover_backup(backup)
        _trim_history(history_csv, _backup_epoch(backup))
    elif chief and os.path.exists(history_csv):  # a run that died before its first epoch
        os.remove(history_csv)
    # The epochs before a resume, as the backup holds them (process 0 trims the rows
    # beyond; every process reads the same ones), for early stopping to go on from.
    done = _backup_epoch(backup) if resuming else 0
    previous = (read_history(history_csv).get(monitor, [])[:done]
                if done and os.path.exists(history_csv) else [])
    # Training wall-clock seconds over every session of the run, put into each epoch's
    # logs before the logger writes them: history.csv's "seconds" column (time to
    # accuracy, from any run).
    clock = {"offset": _history_seconds(history_csv) if chief else 0.0}
    clock_cb = keras.callbacks.LambdaCallback(
        on_train_begin=lambda logs: clock.update(start=time.time()),
        on_epoch_end=lambda epoch, logs: logs.__setitem__(
            "seconds", round(clock["offset"] + time.time() - clock["start"], 2)))
    common = [
        keras.callbacks.TerminateOnNaN(),
        # Remembers the epoch of a NaN loss (TerminateOnNaN then stops), for the report.
        keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: nan.update(
            current=epoch), on_train_batch_end=note_nan),
    ]
    # With --ema, validation and the two checkpoints see the averaged weights; the
    # backup, before the swap, keeps the raw ones (and the average in the optimiser).
    ema = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if config.ema else []
    best_path = os.path.join(out, "best.keras")
    # A resumed run's best.keras must beat the epochs before the crash, not just the
    # first epoch after it: ModelCheckpoint starts from -inf unless told.
    seen = [v for v in previous if np.isfinite(v)]
    best_so_far = max(seen) if seen and os.path.exists(best_path) else None
    best_checkpoint = (AtomicCheckpoint(
        best_path, monitor=monitor, mode="max", save_best_only=True,
        initial_value_threshold=best_so_far)
        if val_data is not None else LastFiniteCheckpoint(best_path))
    if not chief:  # restores process 0's backup; writes nothing
        callbacks = [RestoreOnly(backup, delete_checkpoint=False), *ema, clock_cb, *common]
    else:
        callbacks = [
            clock_cb,
            # Before the backup, so history.csv always holds every backed-up epoch
            # (a row the backup lacks is trimmed on resume).
            keras.callbacks.CSVLogger(history_csv, append=True),
            # Saves weights, optimiser state and epoch each epoch; a re-run restores
            # them. double_checkpoint keeps the previous one should a kill hit a save.
            keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False,
                                             double_checkpoint=True),
            *ema,
            best_checkpoint,
            AtomicCheckpoint(os.path.join(out, "last.keras")),
            *common]
        if tensorflow_available():  # Keras's TensorBoard writes through tf.summary
            callbacks.append(keras.callbacks.TensorBoard(os.path.join(out, "logs"),
                                                         write_graph=False))
    if getattr(strategy, "num_processes", 1) > 1:
        callbacks = [OffMesh(c) if isinstance(c, (keras.callbacks.BackupAndRestore,
                                                  keras.callbacks.ModelCheckpoint)) else c
                     for c in callbacks]
    if splits.counts:  # count decoded images over this session's first epoch only
        callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: [
            c.active.assign(False) for c in splits.counts.values() if c is not
            splits.counts.get("test")]))
    stopped_before = False
    if config.early_stopping:  # validation metrics are global: every process stops alike
        callbacks.append(ResumedEarlyStopping(monitor, config.early_stopping, previous))
        stopped_before = early_stopping_state(previous, config.early_stopping)[2]
    if chief:
        print(f"training {model.name} on {splits.num_train} images, {splits.num_validation} "
              f"for validation; {keras.backend.backend()}, {pipeline_of(config)} pipeline, "
              f"{strategy.num_replicas_in_sync} replica(s), global batch {global_batch}, "
              f"peak lr {lr:g}, {keras.mixed_precision.global_policy().name}"
              f", XLA {'on' if jit else 'off'}")
    start = time.time()
    if stopped_before:  # fit would train one more epoch before EarlyStopping looks
        if chief:
            print(f"early stopping: the run stopped after epoch {done} ({monitor} did not "
                  f"improve for {config.early_stopping} epochs); nothing left to train")
    else:
        with unknown_length_ok():
            model.fit(train_data, steps_per_epoch=steps_per_epoch, epochs=config.epochs,
                      validation_data=val_data, callbacks=callbacks,
                      verbose=config.verbose if chief else 0, shuffle=False)  # shuffled
    return model, {"train_seconds": time.time() - start, "nan": nan,
                   "global_batch": global_batch}


def _report(config, strategy, splits, model, fitted):
    """history.csv -> curves; the test set scored once with the best checkpoint."""
    out, nan = config.output_dir, fitted["nan"]
    if "epoch" in nan and not os.path.exists(os.path.join(out, "best.keras")):
        raise ValueError(f"training stopped: the loss became NaN in epoch {nan['epoch']} before "
                         "any checkpoint was saved; lower --lr (or set --clipnorm)")
    history = read_history(os.path.join(out, "history.csv"))
    evaluation.plot_history(history, os.path.join(out, "curves.png"))

    report = {"backend": keras.backend.backend(),
              "replicas": strategy.num_replicas_in_sync,
              "processes": getattr(strategy, "num_processes", 1),
              "pipeline": pipeline_of(config),
              "train_seconds_this_session": round(fitted["train_seconds"], 1),
              "epochs": len(history.get("epoch", []))}
    scores = [v for v in history.get("val_accuracy", []) if np.isfinite(v)]
    if scores:
        report["best_val_accuracy"] = max(scores)
    if "epoch" in nan:
        report["stopped"] = (f"NaN loss in epoch {nan['epoch']}: training ended early; the "
                             "score is of the best checkpoint saved before it")
        print(f"warning: {report['stopped']}")
    if splits.test is not None:
        scored = next((n for n in ("best.keras", "last.keras")
                       if os.path.exists(os.path.join(out, n))), None)
        if scored != "best.keras":  # lost to a kill or deleted: say what is scored
            report["scored"] = (f"{scored} (best.keras is missing)" if scored else
                                "the model in memory (best.keras and last.keras are missing)")
            print(f"note: scoring {report['scored']}")
        best = (keras.saving.load_model(os.path.join(out, scored), compile=False) if scored
                else model)
        if pipeline_of(config) == "memory":
            test_data = splits.test
        else:
            from keras_resnet import data as data_lib

            test_data = data_lib.make_eval_dataset(splits.test, fitted["global_batch"],
                                                   splits.num_classes)
        report.update(evaluation.evaluate(best, test_data, splits.class_names,
                                          tta_flip=config.tta_flip,
                                          tta_shift=config.tta_shift,
                                          batch_size=fitted["global_batch"]))
    if splits.counts:
        # A split still counting had no epoch this session (a resume with none left).
        skipped = {k: c.dropped() for k, c in splits.counts.items()
                   if k != "test" and not c.active.numpy()}
        if "num_images" in report:
            skipped["test"] = splits.num_test - report["num_images"]
        report["skipped_in_pipeline"] = skipped
        if any(skipped.values()):
            print(f"data: files that passed the scan but did not decode, skipped: {skipped}")
    if splits.test is not None:
        write_json(os.path.join(out, "test_metrics.json"), report)
        evaluation.plot_confusion(np.asarray(report["confusion_matrix"]),
                                  splits.class_names, os.path.join(out, "confusion_matrix.png"))
    return report


def read_history(path):
    """history.csv -> {column: [values]}; CSVLogger's "NA" (a metric it did not get,
    e.g. validation without a validation split) reads as NaN."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: [float("nan") if r[k] == "NA" else float(r[k]) for r in rows]
            for k in (rows[0] if rows else {})}
