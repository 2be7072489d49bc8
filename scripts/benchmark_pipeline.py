"""Is the input pipeline ever the bottleneck? Three figures, measured side by side.

1. ``pipeline_img_s``: the full augmented training pipeline alone (cache warm).
2. ``train_fed_img_s``: ResNet18 (CIFAR stem) training steps fed by that pipeline.
3. ``train_inmemory_img_s``: the same steps fed by the same batches already in memory.

The two training figures alternate (A B A B ...) and medians are quoted, so a
drift of this shared machine hits both. The last output line is one JSON object.

    python scripts/benchmark_pipeline.py --data-dir ../shared/data/cifar10-jpeg
"""

import argparse
import json
import statistics
import time

from keras_resnet import benchmark, data, training  # before TensorFlow: its oneDNN default

# isort: split
import keras
import numpy as np
import tensorflow as tf


def time_pipeline(ds, batches):
    """Images/s of iterating ``batches`` batches (after one warm-up batch)."""
    it = iter(ds)
    next(it)
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        x, _ = next(it)
        n += int(x.shape[0])
    return n / (time.perf_counter() - start)


def time_training(model, ds, steps, batch_size):
    """Images/s of ``steps`` training steps; a first call of ``fit`` warms up."""
    model.fit(ds, steps_per_epoch=2, epochs=1, verbose=0, shuffle=False)
    start = time.perf_counter()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
    return steps * batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="image folder (default: tfds cifar10)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-images", type=int, default=20000,
                        help="training images loaded (the pipeline's cache)")
    parser.add_argument("--pipeline-batches", type=int, default=150)
    parser.add_argument("--steps", type=int, default=30, help="training steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for name in ("batch_size", "train_images", "pipeline_batches", "steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    splits = data.load_splits(data_dir=args.data_dir, validation_size=0,
                              max_train_images=args.train_images, max_eval_images=1)
    ds = data.make_train_dataset(splits.train, args.batch_size, splits.num_classes,
                                 seed=0, image_size=splits.image_size).repeat()
    for _ in iter(ds.take(splits.num_train // args.batch_size + 1)):
        pass  # fill the decode cache: steady state is what training sees
    pipeline = [time_pipeline(ds, args.pipeline_batches) for _ in range(args.rounds)]

    model = training.classifier_for(training.TrainConfig(), splits)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    x, y = zip(*[(a.numpy(), b.numpy()) for a, b in ds.take(args.steps + 2)], strict=True)
    in_memory = tf.data.Dataset.from_tensor_slices(
        (np.concatenate(x), np.concatenate(y))).batch(args.batch_size).repeat()
    fed, mem = [], []
    for _ in range(args.rounds):
        fed.append(time_training(model, ds, args.steps, args.batch_size))
        mem.append(time_training(model, in_memory, args.steps, args.batch_size))
    ratios = [f / m for f, m in zip(fed, mem, strict=True)]
    result = {
        "source": args.data_dir or "tfds cifar10", "batch_size": args.batch_size,
        "rounds": args.rounds, "steps_per_round": args.steps,
        "pipeline_img_s": round(statistics.median(pipeline), 1),
        "train_fed_img_s": round(statistics.median(fed), 1),
        "train_inmemory_img_s": round(statistics.median(mem), 1),
        "fed_over_inmemory_median_ratio": round(statistics.median(ratios), 3),
        "pipeline_runs": [round(v, 1) for v in pipeline],
        "train_fed_runs": [round(v, 1) for v in fed],
        "train_inmemory_runs": [round(v, 1) for v in mem],
        "machine": benchmark.machine(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
