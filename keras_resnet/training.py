"""Training: one config, optimiser and LR schedule, callbacks, a run directory.

``train(config)`` reads top to bottom: validate, data, model, optimiser and
schedule, fit (resumable), report. Everything a run produced lands in
``config.output_dir``: ``config.json``, ``best.keras``, ``last.keras``,
``history.csv``, ``curves.png``, TensorBoard ``logs/``, ``test_metrics.json``
and ``confusion_matrix.png``.
"""

import csv
import dataclasses
import json
import os
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from keras_resnet import data as data_lib
from keras_resnet import evaluation
from keras_resnet.model import MODELS, STEMS, build_classifier

OPTIMIZERS = ("sgd", "nesterov", "rmsprop", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine", "onecycle")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
STRATEGIES = ("default", "mirrored", "multiworker")
ONE_CYCLE_START = 1 / 25  # one-cycle warm-up starts at this fraction of the peak LR
LR_REFERENCE_BATCH = 128  # ``lr`` is given per 128 images; scaled linearly with the batch
# Fields that may differ when a run directory is resumed (they do not change the math).
RESUMABLE_FIELDS = ("output_dir", "verbose", "tta_flip")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are the project's recipe for CIFAR-10."""

    model: str = "resnet18"            # a name of keras_resnet.MODELS
    stem: str = "cifar"                # imagenet | cifar | deep
    dataset: str = "cifar10"           # tfds name, used without data_dir
    data_dir: str | None = None        # image folder root/<split>/<class>/*; None = tfds
    tfds_data_dir: str | None = None   # tfds data directory (default: TFDS_DATA_DIR)
    output_dir: str = "runs/resnet18_cifar10"  # run directory; the same one resumes
    epochs: int = 30
    batch_size: int = 128              # per replica; global = batch_size * replicas
    optimizer: str = "nesterov"        # sgd | nesterov | rmsprop | adam | adamw
    lr: float = 0.2                    # peak LR per 128 images (linear scaling)
    momentum: float = 0.9
    weight_decay: float = 5e-4         # L2 as in PyTorch (decoupled for adamw)
    decay_bn_and_bias: bool = False    # also decay BatchNorm parameters and biases
    schedule: str = "onecycle"         # constant | step | cosine | onecycle
    warmup_epochs: float = 0.5         # linear warm-up (cosine, onecycle), in epochs
    step_milestones: str = "0.5,0.75"  # step decay at these fractions of the run
    step_gamma: float = 0.1            # step decay factor
    label_smoothing: float = 0.1
    clipnorm: float = 0.0              # gradient clipping by global norm; 0 = off
    zero_init_residual: bool = True    # last BN gamma of each block starts at 0
    crop_flip: bool = True             # pad-4 random crop + horizontal flip
    rotation: float = 0.0              # degrees
    color_jitter: float = 0.0
    erasing: float = 0.0               # random-erasing probability
    mixup: float = 0.0                 # Beta alpha
    cutmix: float = 0.0                # Beta alpha
    randaugment: int = 0               # ops per image
    augment_in_model: bool = False     # augment inside the model (on the accelerator)
    validation_size: int = 5000        # images carved from train; test is scored once
    max_train_images: int | None = None
    max_eval_images: int | None = None
    seed: int = 0
    precision: str = "auto"            # auto | float32 | bfloat16 | float16
    jit_compile: str = "auto"          # auto | on | off (XLA); auto = on for GPUs only
    steps_per_execution: int = 1
    strategy: str = "default"          # default | mirrored | multiworker
    early_stopping: int = 0            # patience in epochs; 0 = off
    tta_flip: bool = False             # flip test-time augmentation for the test score
    verbose: int = 1                   # Keras progress bar: 0 silent, 1 bar, 2 line/epoch

    def augment(self):
        return data_lib.AugmentConfig(
            crop_flip=self.crop_flip, rotation=self.rotation, color_jitter=self.color_jitter,
            erasing=self.erasing, mixup=self.mixup, cutmix=self.cutmix,
            randaugment=self.randaugment, in_model=self.augment_in_model)

    def validate(self):
        """Raise ``ValueError`` naming the first bad field, before any work."""
        checks = [
            ("model", self.model in MODELS, f"one of {', '.join(MODELS)}"),
            ("stem", self.stem in STEMS, f"one of {', '.join(STEMS)}"),
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
            ("validation_size", _is_int(self.validation_size) and self.validation_size >= 0,
             "an integer >= 0"),
            ("max_train_images", self.max_train_images is None or self.max_train_images >= 1,
             ">= 1"),
            ("max_eval_images", self.max_eval_images is None or self.max_eval_images >= 1,
             ">= 1"),
            ("precision", self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
            ("jit_compile", self.jit_compile in ("auto", "on", "off"), "auto, on or off"),
            ("steps_per_execution", self.steps_per_execution >= 1, ">= 1"),
            ("strategy", self.strategy in STRATEGIES, f"one of {', '.join(STRATEGIES)}"),
            ("early_stopping", self.early_stopping >= 0, ">= 0"),
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
        if self.data_dir is not None and not os.path.isdir(self.data_dir):
            raise ValueError(f"data_dir: {self.data_dir!r} is not a directory (expected an "
                             "image folder root/train/<class>/*.jpg)")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def smoke_config(**overrides):
    """A tiny run for tests and CI: few images, one epoch, small batches."""
    return dataclasses.replace(
        TrainConfig(epochs=1, batch_size=8, validation_size=16, max_train_images=64,
                    max_eval_images=16, verbose=0, warmup_epochs=0.0), **overrides)


def baseline_config(**overrides):
    """The plain baseline the recipe is measured against (issue #4)."""
    return dataclasses.replace(
        TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
                    decay_bn_and_bias=True, schedule="cosine", warmup_epochs=0.0,
                    label_smoothing=0.0, zero_init_residual=False, batch_size=128),
        **overrides)


# --------------------------------------------------------------------- model & optimiser


def classifier_for(config, splits):
    """The model ``config`` trains on ``splits``: preprocessing inside, logits out."""
    augmenter = (data_lib.build_augmenter(config.augment(), splits.image_size, config.seed)
                 if config.augment_in_model else None)
    return build_classifier(config.model, image_size=splits.image_size,
                            num_classes=splits.num_classes, mean=splits.mean, std=splits.std,
                            augmenter=augmenter, stem=config.stem,
                            zero_init_residual=config.zero_init_residual)


def _no_decay(variable):
    """BatchNorm parameters and biases: no weight decay unless asked."""
    return variable.path.endswith(("/gamma", "/beta", "/bias"))


def make_optimizer(config, schedule, model):
    """The optimiser; weight decay as intended for each kind.

    For SGD / RMSprop / Adam it is PyTorch-style L2 (``wd * w`` added to the
    gradient, so momentum carries it): Keras's ``weight_decay`` argument is
    decoupled, which for SGD with momentum is ~10x weaker at the same value.
    AdamW uses Keras's decoupled decay, which is what AdamW means.
    """
    skip = [] if config.decay_bn_and_bias else [v for v in model.trainable_weights
                                                 if _no_decay(v)]
    decayed = [v for v in model.trainable_weights if not any(v is s for s in skip)]
    clip = {"global_clipnorm": config.clipnorm} if config.clipnorm else {}
    if config.optimizer == "adamw":
        opt = keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay, **clip)
        opt.exclude_from_weight_decay(var_list=skip)
        return opt
    if config.weight_decay:
        for v in decayed:
            v.regularizer = keras.regularizers.L2(config.weight_decay / 2)
    if config.optimizer in ("sgd", "nesterov"):
        return keras.optimizers.SGD(schedule, momentum=config.momentum,
                                    nesterov=config.optimizer == "nesterov", **clip)
    if config.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(schedule, momentum=config.momentum, **clip)
    return keras.optimizers.Adam(schedule, **clip)


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
    start = lr * ONE_CYCLE_START if config.schedule == "onecycle" else 0.0
    return keras.optimizers.schedules.CosineDecay(
        start, total - warmup, warmup_target=lr, warmup_steps=warmup)


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
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "mixed_bfloat16" if cpu_has_bfloat16() else "float32"
    major = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability",
                                                                   (0, 0))[0]
    return "mixed_bfloat16" if major >= 8 else "mixed_float16"


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


class KerasMultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """MultiWorkerMirroredStrategy that accepts the reductions Keras 3 asks of it.

    Keras 3's TF trainer (checked on 3.15) reduces a nested (x, y) batch at the
    start of ``fit`` and asks for ``reduce(MEAN, scalar, axis=0)`` on each
    step's metrics; the stock strategy rejects both. Reducing leaf by leaf,
    with no axis for scalars, is what Keras means.
    """

    def reduce(self, reduce_op, value, axis):
        def leaf(v):
            first = self.experimental_local_results(v)[0]
            rank = getattr(first, "shape", tf.TensorShape([])).rank
            return super(KerasMultiWorkerStrategy, self).reduce(
                reduce_op, v, axis if rank else None)

        return tf.nest.map_structure(leaf, value)


def make_strategy(name):
    """tf.distribute strategy by name: one device, the GPUs of one machine, or workers."""
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":  # the cluster comes from TF_CONFIG
        return KerasMultiWorkerStrategy()
    return tf.distribute.get_strategy()


# --------------------------------------------------------------------------- run dir


def prepare_run_dir(config):
    """Create / check the run directory; refuse a resume with another config."""
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
        with open(path) as f:
            saved = json.load(f)
        differ = {k: (saved.get(k), v) for k, v in dataclasses.asdict(config).items()
                  if k not in RESUMABLE_FIELDS and saved.get(k) != v}
        if differ and resuming:
            lines = ", ".join(f"{k}: run has {a!r}, asked {b!r}" for k, (a, b) in differ.items())
            raise ValueError(f"output_dir: {out!r} holds an unfinished run with another "
                             f"config ({lines}); use a new --output-dir or the same flags")
    write_json(path, dataclasses.asdict(config))
    return resuming


def write_json(path, obj):
    """Write JSON atomically (temporary file, then rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _trim_history(path, epochs_done):
    """Drop history rows of epochs the backup does not hold (killed mid-write)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = list(csv.reader(f))
    keep = rows[:1] + [r for r in rows[1:] if r and int(r[0]) < epochs_done]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(keep)


def _backup_epoch(backup_dir):
    meta = os.path.join(backup_dir, "training_metadata.json")
    if not os.path.exists(meta):
        return 0
    with open(meta) as f:
        return int(json.load(f).get("epoch", 0))  # epochs completed


# ------------------------------------------------------------------------------ train


def train(config):
    """Train, keep the best checkpoint, score the test set once; returns the report.

    The global dtype policy is set for the run and restored afterwards.
    """
    config.validate()
    resuming = prepare_run_dir(config)
    # First TF call: multi-worker collectives must be configured at start-up.
    strategy = make_strategy(config.strategy)
    policy = keras.config.dtype_policy()
    try:
        keras.config.set_dtype_policy(resolve_precision(config.precision))
        return _train(config, strategy, resuming)
    finally:
        keras.config.set_dtype_policy(policy)


def _train(config, strategy, resuming):
    out = config.output_dir
    keras.utils.set_random_seed(config.seed)
    jit = config.jit_compile == "on" or (
        config.jit_compile == "auto" and bool(tf.config.list_physical_devices("GPU")))

    splits = data_lib.load_splits(
        config.dataset, data_dir=config.data_dir, tfds_data_dir=config.tfds_data_dir,
        validation_size=config.validation_size, max_train_images=config.max_train_images,
        max_eval_images=config.max_eval_images, seed=config.seed)
    if splits.report:
        print(f"data: {json.dumps(splits.report)}")
    with open(os.path.join(out, "labels.txt"), "w") as f:
        f.writelines(f"{name}\n" for name in splits.class_names)
    global_batch = config.batch_size * strategy.num_replicas_in_sync
    steps_per_epoch = splits.num_train // global_batch
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size: global batch {global_batch} is larger than the "
                         f"{splits.num_train} training images")
    lr = config.lr * global_batch / LR_REFERENCE_BATCH
    train_ds = data_lib.make_train_dataset(
        splits.train, global_batch, splits.num_classes, augment=config.augment(),
        seed=config.seed, image_size=splits.image_size)
    val_ds = (data_lib.make_eval_dataset(splits.validation, global_batch, splits.num_classes)
              if splits.validation is not None else None)

    with strategy.scope():
        model = classifier_for(config, splits)
        optimizer = make_optimizer(config, make_schedule(config, steps_per_epoch, lr), model)
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.CategoricalCrossentropy(
                from_logits=True, label_smoothing=config.label_smoothing),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"),
                     keras.metrics.TopKCategoricalAccuracy(5, name="top5")],
            jit_compile=jit, steps_per_execution=config.steps_per_execution)

    monitor = "val_accuracy" if val_ds is not None else "accuracy"
    backup = os.path.join(out, "backup")
    history_csv = os.path.join(out, "history.csv")
    if resuming:
        _trim_history(history_csv, _backup_epoch(backup))
    elif os.path.exists(history_csv):  # a run that died before its first epoch ended
        os.remove(history_csv)
    callbacks = [
        # Before the backup, so history.csv always holds every backed-up epoch
        # (a row the backup lacks is trimmed on resume).
        keras.callbacks.CSVLogger(history_csv, append=True),
        # Saves weights, optimiser state and epoch each epoch; a re-run restores
        # them. double_checkpoint keeps the previous one should a kill hit a save.
        keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False,
                                         double_checkpoint=True),
        keras.callbacks.ModelCheckpoint(os.path.join(out, "best.keras"), monitor=monitor,
                                        mode="max", save_best_only=True),
        keras.callbacks.ModelCheckpoint(os.path.join(out, "last.keras")),
        keras.callbacks.TensorBoard(os.path.join(out, "logs"), write_graph=False),
        keras.callbacks.TerminateOnNaN(),
    ]
    if config.early_stopping:
        callbacks.append(keras.callbacks.EarlyStopping(monitor, mode="max",
                                                       patience=config.early_stopping))
    print(f"training {model.name} on {splits.num_train} images, {splits.num_validation} "
          f"for validation; {strategy.num_replicas_in_sync} replica(s), global batch "
          f"{global_batch}, peak lr {lr:g}, {keras.mixed_precision.global_policy().name}"
          f", XLA {'on' if jit else 'off'}")
    start = time.time()
    model.fit(train_ds, epochs=config.epochs, validation_data=val_ds, callbacks=callbacks,
              verbose=config.verbose, shuffle=False)  # tf.data already shuffles
    train_seconds = time.time() - start
    if model.stop_training and not os.path.exists(os.path.join(out, "best.keras")):
        raise RuntimeError("training stopped (NaN loss) before any checkpoint was saved")
    history = read_history(history_csv)
    evaluation.plot_history(history, os.path.join(out, "curves.png"))

    report = {"train_seconds_this_session": round(train_seconds, 1),
              "epochs": len(history.get("epoch", []))}
    if splits.test is not None:
        best = keras.saving.load_model(os.path.join(out, "best.keras"), compile=False)
        test_ds = data_lib.make_eval_dataset(splits.test, global_batch, splits.num_classes)
        report.update(evaluation.evaluate(best, test_ds, splits.class_names,
                                          tta_flip=config.tta_flip))
        write_json(os.path.join(out, "test_metrics.json"), report)
        evaluation.plot_confusion(np.asarray(report["confusion_matrix"]),
                                  splits.class_names, os.path.join(out, "confusion_matrix.png"))
    return report


def read_history(path):
    """history.csv -> {column: [values]}."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows] for k in (rows[0] if rows else {})}
