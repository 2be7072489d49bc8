"""Training speed of ResNet18 (CIFAR stem) under precision / XLA settings, side by side.

Measures images/s of training steps on in-memory batches for each setting,
alternating the settings round by round (A B C A B C ...) and quoting medians,
so a drift of this shared machine hits all of them. This is what the
``--precision auto`` / ``--jit-compile auto`` defaults of the training script
are based on. The last output line is one JSON object.

    python scripts/benchmark_training.py --settings float32,float32+xla,bfloat16
"""

import argparse
import json
import statistics
import time

import keras
import numpy as np
import tensorflow as tf

from keras_resnet import training
from keras_resnet.model import build_classifier


def build(setting, batch_size, steps):
    precision, _, xla = setting.partition("+")
    keras.mixed_precision.set_global_policy(training.resolve_precision(precision))
    keras.utils.set_random_seed(0)
    model = build_classifier("resnet18", image_size=(32, 32), num_classes=10,
                             mean=(125, 123, 114), std=(63, 62, 67), stem="cifar")
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                  jit_compile=xla == "xla")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch_size * steps, 32, 32, 3)).astype("float32")
    y = np.eye(10, dtype="float32")[rng.integers(0, 10, batch_size * steps)]
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).cache().repeat()
    model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)  # trace / compile
    keras.mixed_precision.set_global_policy("float32")
    return model, ds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="float32,float32+xla,bfloat16",
                        help="comma-separated: float32 | bfloat16 | float16, optional +xla")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    settings = args.settings.split(",")
    for s in settings:
        precision, _, xla = s.partition("+")
        if precision not in training.PRECISIONS or xla not in ("", "xla"):
            parser.error(f"--settings: bad entry {s!r}")
    built = {s: build(s, args.batch_size, args.steps) for s in settings}
    runs = {s: [] for s in settings}
    for _ in range(args.rounds):
        for s, (model, ds) in built.items():
            start = time.perf_counter()
            model.fit(ds, steps_per_epoch=args.steps, epochs=1, verbose=0)
            runs[s].append(args.steps * args.batch_size / (time.perf_counter() - start))
    base = statistics.median(runs[settings[0]])
    for s in settings:
        median = statistics.median(runs[s])
        print(f"{s:16} median {median:7.1f} img/s  ({median / base:.2f}x {settings[0]})")
    print(json.dumps({"device": "GPU" if tf.config.list_physical_devices("GPU") else "CPU",
                      "batch_size": args.batch_size, "steps": args.steps,
                      "img_s_median": {s: round(statistics.median(v), 1)
                                       for s, v in runs.items()},
                      "img_s_runs": {s: [round(x, 1) for x in v] for s, v in runs.items()}}))


if __name__ == "__main__":
    main()
