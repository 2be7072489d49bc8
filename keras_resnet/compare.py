"""Compare ResNets with other CNNs: parameters, FLOPs, speed and accuracy.

Every candidate gets the same input (float 0..255 with the ``normalize``
layer of the training split), a fresh classification head, the same optimiser
and the same training budget, so the table compares architectures.
"""

import csv
import dataclasses
import os
import time

import keras
import numpy as np
import tensorflow as tf

from keras_resnet import data as data_lib
from keras_resnet import export
from keras_resnet.benchmark import latency_ms
from keras_resnet.model import build_classifier
from keras_resnet.predict import TFLiteModel
from keras_resnet.training import build_optimizer

RESNETS = ("resnet18", "resnet34", "resnet50")
APPLICATIONS = {
    "mobilenetv2": "MobileNetV2",
    "efficientnetb0": "EfficientNetB0",
    "densenet121": "DenseNet121",
    "vgg16": "VGG16",
}
CANDIDATES = (*RESNETS, *APPLICATIONS, "small_cnn")


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    models: tuple = CANDIDATES
    data_dir: str | None = None       # image folder; None = tfds cifar10
    output_dir: str = "runs/compare"
    epochs: int = 1                   # training budget, the same for every model
    train_images: int = 2000          # training images per epoch
    eval_images: int = 1000           # test images scored
    batch_size: int = 64
    lr: float = 0.05                  # SGD + momentum, cosine to 0, per 64 images
    latency_runs: int = 50            # TFLite batch-1 runs (after 5 warm-up runs)
    seed: int = 0

    def validate(self):
        unknown = [m for m in self.models if m not in CANDIDATES]
        if unknown or not self.models:
            raise ValueError(f"models: unknown {unknown or 'empty list'}; allowed: "
                             f"{', '.join(CANDIDATES)}")
        for name in ("epochs", "train_images", "eval_images", "batch_size", "latency_runs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: got {value!r}; the budget must be an integer >= 1")
        if self.data_dir is not None and not os.path.isdir(self.data_dir):
            raise ValueError(f"data_dir: {self.data_dir!r} is not a directory")


def small_cnn(x, classes):
    """A plain 4-conv CNN baseline (conv-BN-ReLU pairs, max-pool, dense head)."""
    for i, filters in enumerate((32, 64, 128), start=1):
        for j in (1, 2):
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                                    name=f"block{i}_conv{j}")(x)
            x = keras.layers.BatchNormalization(name=f"block{i}_bn{j}")(x)
            x = keras.layers.ReLU(name=f"block{i}_relu{j}")(x)
        x = keras.layers.MaxPooling2D(name=f"block{i}_pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.layers.Dense(classes, name="predictions")(x)


def build_candidate(name, image_size, classes, mean, std):
    """A candidate model: normalisation inside, logits out, fresh head."""
    if name in RESNETS:
        return build_classifier(name, image_size=image_size, num_classes=classes, mean=mean,
                                std=std, stem="cifar", zero_init_residual=True)
    inputs = keras.Input((*image_size, 3), name="image")
    x = keras.layers.Normalization(mean=list(mean), variance=[s * s for s in std],
                                   name="normalize")(inputs)
    if name == "small_cnn":
        return keras.Model(inputs, small_cnn(x, classes), name=name)
    app = getattr(keras.applications, APPLICATIONS[name])
    backbone = app(include_top=False, weights=None, input_shape=(*image_size, 3),
                   pooling="avg")
    outputs = keras.layers.Dense(classes, name="predictions")(backbone(x))
    return keras.Model(inputs, outputs, name=name)


def count_flops(model):
    """FLOPs of one image's forward pass, counted by TF's profiler on the traced graph
    (a multiply-add counts 2). The profiler has only a v1 API; it reads the shapes of
    the graph's ops, so the variables need not be frozen."""
    spec = tf.TensorSpec((1, *model.input_shape[1:]), tf.float32)
    graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec).graph
    options = (tf.compat.v1.profiler.ProfileOptionBuilder(
        tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()).with_empty_output()
        .build())
    info = tf.compat.v1.profiler.profile(graph=graph, run_meta=tf.compat.v1.RunMetadata(),
                                         cmd="op", options=options)
    return int(info.total_float_ops)


def tflite_latency_ms(model, runs):
    """Median batch-1 latency of the float32 TFLite model (LiteRT, 2 threads).

    Direct convolutions as the converter makes them (no Winograd rewrite), so
    the figure compares architectures, not export tricks.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.tflite")
        with open(path, "wb") as f:
            f.write(export.convert_tflite(model, "tflite_float32"))
        runner = TFLiteModel(path, num_threads=2)
        image = np.zeros((1, *runner.image_size, 3), np.uint8)
        return latency_ms(runner, image, runs)["median_ms"]


def measure(name, splits, config):
    """All figures of one candidate."""
    keras.utils.set_random_seed(config.seed)
    model = build_candidate(name, splits.image_size, splits.num_classes, splits.mean,
                            splits.std)
    steps = splits.num_train // config.batch_size
    lr = config.lr * config.batch_size / 64
    model.compile(optimizer=keras.optimizers.SGD(
        keras.optimizers.schedules.CosineDecay(lr, steps * config.epochs), momentum=0.9),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    build_optimizer(model)
    train_ds = data_lib.make_train_dataset(splits.train, config.batch_size,
                                           splits.num_classes, seed=config.seed,
                                           image_size=splits.image_size)
    test_ds = data_lib.make_eval_dataset(splits.test, 256, splits.num_classes)
    epoch_times = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            if batch == 0:  # leave out the first step: tracing, not training
                self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_times.append(time.perf_counter() - self.start)

    # repeat + steps: a folder pipeline that drops undecodable files has no known length.
    model.fit(train_ds.repeat(), steps_per_epoch=steps, epochs=config.epochs, verbose=2,
              callbacks=[EpochTimer()], shuffle=False)  # tf.data already shuffles
    model.predict(test_ds.take(1), verbose=0)  # warm-up
    start = time.perf_counter()
    probs = model.predict(test_ds.map(lambda x, y: x), verbose=0)
    infer_s = time.perf_counter() - start
    labels = np.concatenate([np.argmax(y, 1) for _, y in test_ds.as_numpy_iterator()])
    train_img_s = (steps - 1) * config.batch_size / min(epoch_times)
    return {
        "model": name,
        "params": model.count_params(),
        "gflops": round(count_flops(model) / 1e9, 3),
        "train_img_s": round(train_img_s, 1),
        "infer_img_s": round(len(labels) / infer_s, 1),
        "tflite_ms": round(tflite_latency_ms(model, config.latency_runs), 2),
        "test_top1": round(float(np.mean(np.argmax(probs, 1) == labels)), 4),
    }


COLUMNS = ("model", "params", "gflops", "train_img_s", "infer_img_s", "tflite_ms",
           "test_top1")


def markdown_table(rows):
    head = ("model", "params (M)", "GFLOPs", "train img/s", "infer img/s",
            "TFLite ms (b=1)", "test top-1")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f} | {r['gflops']:.3f} | "
                     f"{r['train_img_s']:.1f} | {r['infer_img_s']:.1f} | {r['tflite_ms']:.2f} | "
                     f"{r['test_top1']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(rows, x_key, x_label, path, log_x=False):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        x = r[x_key] / 1e6 if x_key == "params" else r[x_key]
        ax.scatter(x, r["test_top1"] * 100)
        ax.annotate(r["model"], (x, r["test_top1"] * 100), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare(config):
    """Measure every model of ``config.models``; writes CSV, Markdown and PNGs."""
    config.validate()
    os.makedirs(config.output_dir, exist_ok=True)
    splits = data_lib.load_splits("cifar10", data_dir=config.data_dir,
                                  validation_size=0, max_train_images=config.train_images,
                                  max_eval_images=config.eval_images, seed=config.seed)
    if splits.test is None:
        raise ValueError(f"data_dir: {config.data_dir!r} has no test/ split to score")
    rows = []
    for i, name in enumerate(config.models, start=1):
        print(f"[{i}/{len(config.models)}] {name}: training {config.epochs} epoch(s) on "
              f"{splits.num_train} images, then timing", flush=True)
        rows.append(measure(name, splits, config))
        print(f"[{i}/{len(config.models)}] {name}: {rows[-1]}", flush=True)
    out = config.output_dir
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = markdown_table(rows)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    plot(rows, "tflite_ms", "TFLite float32 latency, batch 1 (ms)",
         os.path.join(out, "accuracy_vs_latency.png"), log_x=True)
    plot(rows, "params", "parameters (M)", os.path.join(out, "accuracy_vs_params.png"),
         log_x=True)
    return rows, table
