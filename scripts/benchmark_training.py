"""Training speed of ResNet18 (or ``--model``, a name of keras_resnet.MODELS; CIFAR stem),
side by side.

Two modes; the last output line is one JSON object, with the machine.

``--backend tensorflow|jax``: the project's model and recipe under that Keras
backend beside the same network and recipe in PyTorch (keras_resnet.torch_training:
channels_last, foreach / fused SGD, bf16 autocast and torch.compile on a GPU).
Each side runs in its own worker process; rounds alternate (K T K T ...) and
medians are quoted, so a drift of this shared machine hits both. The first
call's time includes tracing / compilation. With ``--epochs N --data-dir D``
both then train N epochs on D's training images (pad-crop + flip on the
device) and score D's test split: seconds per epoch and test top-1. ``--keras-env
NAME=VALUE`` adds the Keras side once more under that environment variable, in the
same rounds (oneDNN off, say).

    python scripts/benchmark_training.py --backend tensorflow --rounds 5
    python scripts/benchmark_training.py --backend tensorflow --keras-env TF_ENABLE_ONEDNN_OPTS=0
    python scripts/benchmark_training.py --backend jax --batch-size 512 --steps 200 \\
        --epochs 10 --data-dir ../shared/data/cifar10-jpeg

``--settings``: the TensorFlow backend under precision / XLA settings (what
``--precision auto`` / ``--jit-compile auto`` are based on), ``+kerasbn`` for
Keras's composed BatchNorm in place of the model's fused one, and ``+muon`` /
``+muonf32`` for the recipe's Muon (Newton-Schulz in the policy's compute dtype /
in float32) in place of SGD:

    python scripts/benchmark_training.py --settings float32,float32+xla,bfloat16
    python scripts/benchmark_training.py --settings float32,float32+kerasbn
    python scripts/benchmark_training.py --settings bfloat16,bfloat16+muonf32,bfloat16+muon
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import numpy as np

CIFAR_MEAN, CIFAR_STD = (125.31, 122.95, 113.87), (62.99, 62.09, 66.70)


# ------------------------------------------------------------------- worker processes


def load_arrays(args):
    """(train images, labels, test images, labels, class count): a folder's, or random."""
    if args["data_dir"]:
        from keras_resnet import arrays

        splits = arrays.load_memory_splits(data_dir=args["data_dir"], validation_size=0,
                                           max_train_images=args["max_train_images"],
                                           max_eval_images=args["max_eval_images"],
                                           stats=False)
        test = splits.test or (splits.train[0][:0], splits.train[1][:0])
        return (*splits.train, *test, splits.num_classes)
    rng = np.random.default_rng(0)
    n = args["batch_size"] * args["max_steps"]  # a round never runs out of batches
    return (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.int32), None, None, 10)


def keras_worker(args):
    """The project's model and recipe (training.py's pieces) on this Keras backend."""
    from keras_resnet import arrays, benchmark, evaluation, training  # before TensorFlow

    # isort: split
    import keras

    check_model(args["model"])

    precision = args["precision"]
    if precision == "match":  # what the PyTorch side runs: bf16 autocast on a GPU only
        precision = "bfloat16" if training.gpu_capability() is not None else "float32"
    # Nesterov SGD with its L2 on both sides (torch_training.py); Muon has no PyTorch twin.
    config = training.TrainConfig(batch_size=args["batch_size"], precision=precision,
                                  optimizer="nesterov", lr=0.4, weight_decay=5e-4,
                                  epochs=max(args["epochs"], 1), warmup_epochs=0.0)
    keras.config.set_dtype_policy(training.resolve_precision(config.precision))
    x, y, tx, ty, classes = load_arrays(args)
    state = {}

    def build(total_steps):
        keras.utils.set_random_seed(0)
        model = training.build_classifier(
            args["model"], image_size=(32, 32), num_classes=classes, mean=CIFAR_MEAN,
            std=CIFAR_STD, stem="cifar", augmenter=training.build_augmenter(
                config.augment(), (32, 32), 0), zero_init_residual=True)
        per_epoch = max(total_steps // config.epochs, 1)
        lr = config.lr * config.batch_size / training.LR_REFERENCE_BATCH
        model.compile(optimizer=training.make_optimizer(
            config, training.make_schedule(config, per_epoch, lr), model),
            loss=keras.losses.CategoricalCrossentropy(from_logits=True,
                                                      label_smoothing=config.label_smoothing),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
            jit_compile=training.uses_xla(config))
        state["model"] = model
        state["feed"] = arrays.BatchFeed(x, y, config.batch_size, classes, shuffle=True)
        return {"xla": bool(model.jit_compile), "policy": keras.config.dtype_policy().name,
                "keras": keras.__version__, "onednn": benchmark.onednn_enabled(),
                "device": benchmark.device()}

    def steps(n):
        start = time.perf_counter()
        state["model"].fit(state["feed"], steps_per_epoch=n, epochs=1, verbose=0)
        return time.perf_counter() - start

    def score():
        report = evaluation.evaluate(state["model"], (tx, ty),
                                              [str(i) for i in range(classes)],
                                              batch_size=500)
        return report["top1"]

    return build, steps, score, len(x) // config.batch_size


def torch_worker(args):
    """The same network and recipe in PyTorch."""
    import torch

    from keras_resnet.torch_training import TorchRecipe

    check_model(args["model"])
    gpu = torch.cuda.is_available()
    x, y, tx, ty, classes = load_arrays(args)
    state, rng = {}, np.random.default_rng(0)
    per_epoch = len(x) // args["batch_size"]

    def build(total_steps):
        compiled = args["torch_compile"] == "on" or (args["torch_compile"] == "auto" and gpu)
        state["recipe"] = TorchRecipe(
            num_classes=classes, mean=CIFAR_MEAN, std=CIFAR_STD,
            batch_size=args["batch_size"], total_steps=total_steps,
            device="cuda" if gpu else "cpu", bf16=gpu, compile_model=compiled,
            model=args["model"])
        return {"torch_compile": compiled, "bf16": gpu, "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "device": torch.cuda.get_device_name(0) if gpu else "CPU"}

    def steps(n):
        order = np.concatenate([rng.permutation(len(x)) for _ in range(
            n * args["batch_size"] // len(x) + 1)])
        batches = [order[i * args["batch_size"]:(i + 1) * args["batch_size"]]
                   for i in range(n)]
        return state["recipe"].train_batches(x, y, batches)

    def score():
        return round(state["recipe"].accuracy(tx, ty), 4)

    return build, steps, score, per_epoch


def check_model(name):
    """In each worker (the parent imports no Keras): an unknown --model stops it, with
    the names allowed, before anything is built."""
    from keras_resnet.model import MODELS

    if name not in MODELS:
        print(f"error: --model: got {name!r}; one of {', '.join(MODELS)}", file=sys.stderr)
        sys.exit(2)


def serve(side, args):
    """Answer the controller's commands (one JSON per line) until it says quit."""
    from keras_resnet.benchmark import machine

    build, steps, score, per_epoch = (keras_worker if side == "keras" else torch_worker)(args)
    # The machine as this worker sees it (its backend's oneDNN state): the parent imports
    # no Keras.
    print("READY " + json.dumps({"steps_per_epoch": per_epoch, "machine": machine()}),
          flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "quit":
            return
        if command["op"] == "build":
            result = build(command["total_steps"])
        elif command["op"] == "steps":
            result = {"seconds": steps(command["n"])}
        else:  # score
            result = {"top1": score()}
        print("RESULT " + json.dumps(result), flush=True)


class Worker:
    """One side in its own process (its own backend, thread pools and memory)."""

    def __init__(self, side, args, backend, extra_env=None):
        env = {**os.environ, "KERAS_BACKEND": backend if side == "keras" else "torch",
               "TF_CPP_MIN_LOG_LEVEL": "3", **(extra_env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", side, "--worker-args",
             json.dumps(args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=env)
        self.info = None

    def ready(self):
        """Wait for its start-up (imports, data): the sides start together, and are then
        built and timed one after the other."""
        self.info = self._read("READY ")

    def stop(self):
        """End it now (another worker failed to start)."""
        self.proc.kill()
        self.proc.wait()

    def _read(self, prefix):
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return json.loads(line[len(prefix):])
        raise RuntimeError(f"worker exited with {self.proc.wait()} (its stderr is above)")

    def ask(self, **command):
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read("RESULT ")

    def quit(self):
        """Tell it to stop; ``proc.wait()`` then waits for its exit."""
        self.proc.stdin.write('{"op": "quit"}\n')
        self.proc.stdin.close()


def side_by_side(args):
    worker_args = {"model": args.model, "batch_size": args.batch_size,
                   "precision": args.precision,
                   "data_dir": args.data_dir, "max_train_images": args.max_train_images,
                   "max_eval_images": args.max_eval_images,
                   "epochs": args.epochs, "torch_compile": args.torch_compile,
                   "max_steps": max(args.steps, args.warmup)}
    sides = {"keras": Worker("keras", worker_args, args.backend),
             "torch": Worker("torch", worker_args, args.backend)}
    for setting in args.keras_env:  # the Keras side again, under one more variable
        name, _, value = setting.partition("=")
        sides[f"keras {setting}"] = Worker("keras", worker_args, args.backend, {name: value})
    try:
        for w in sides.values():
            w.ready()
    except RuntimeError as e:  # its message (a bad --model, say) is on stderr above
        for w in sides.values():
            w.stop()
        print(f"error: a worker stopped before it was ready: {e}", file=sys.stderr)
        sys.exit(2)
    per_epoch = sides["keras"].info["steps_per_epoch"]
    if max(args.steps, args.warmup) > per_epoch:  # a Keras epoch is one pass of the feed
        raise SystemExit(f"error: --steps / --warmup: at most {per_epoch}, the batches in one "
                         "pass over the training images")
    result = {"backend": args.backend, "model": args.model, "batch_size": args.batch_size,
              "steps": args.steps,
              "rounds": args.rounds, "sides": {}}
    total = args.warmup + args.rounds * args.steps
    runs = {name: [] for name in sides}
    for name, w in sides.items():
        info = w.ask(op="build", total_steps=total)
        first = w.ask(op="steps", n=args.warmup)["seconds"]
        result["sides"][name] = {**info, "first_steps_seconds": round(first, 2),
                                 "first_steps": args.warmup}
    for _ in range(args.rounds):
        for name, w in sides.items():
            runs[name].append(args.steps * args.batch_size / w.ask(op="steps",
                                                                   n=args.steps)["seconds"])
    for name in sides:
        result["sides"][name].update(img_s_median=round(statistics.median(runs[name]), 1),
                                     img_s_runs=[round(v, 1) for v in runs[name]])
    if args.epochs:
        for name, w in sides.items():
            per_epoch = w.info["steps_per_epoch"]
            w.ask(op="build", total_steps=args.epochs * per_epoch)
            seconds = [w.ask(op="steps", n=per_epoch)["seconds"] for _ in range(args.epochs)]
            result["sides"][name].update(
                epoch_seconds=[round(s, 2) for s in seconds],
                train_seconds=round(sum(seconds), 1), test_top1=w.ask(op="score")["top1"])
    for w in sides.values():  # they exit side by side
        w.quit()
    for w in sides.values():
        w.proc.wait()
    result["machine"] = sides["keras"].info["machine"]
    t = result["sides"]["torch"]["img_s_median"]
    for name in sides:
        if name != "torch":
            k = result["sides"][name]["img_s_median"]
            result[name.replace("keras", "keras_over_torch", 1)] = round(k / t, 3)
            print(f"{name} ({args.backend}) median {k:8.1f} img/s   pytorch median "
                  f"{t:8.1f} img/s   ratio {k / t:.2f}x")
    return result


# ------------------------------------------------------------------- settings mode


def settings_mode(args):
    from keras_resnet import training  # before TensorFlow: its oneDNN default
    from keras_resnet.model import FusedBatchNorm, build_classifier

    # isort: split
    import keras
    import tensorflow as tf

    check_model(args.model)
    settings = args.settings.split(",")
    for s in settings:
        precision, *options = s.split("+")
        if precision not in training.PRECISIONS or not set(options) <= {
                "xla", "kerasbn", "muon", "muonf32"}:
            raise SystemExit(f"error: --settings: bad entry {s!r}")

    def build(setting):
        precision, *options = setting.split("+")
        keras.mixed_precision.set_global_policy(training.resolve_precision(precision))
        keras.utils.set_random_seed(0)
        model = build_classifier(args.model, image_size=(32, 32), num_classes=10,
                                 mean=CIFAR_MEAN, std=CIFAR_STD, stem="cifar")
        if "kerasbn" in options:  # the same model with Keras's composed BatchNorm
            model = keras.models.clone_model(model, clone_function=lambda layer: (
                keras.layers.BatchNormalization if isinstance(layer, FusedBatchNorm)
                else type(layer)).from_config(layer.get_config()))
        optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
        if {"muon", "muonf32"} & set(options):
            optimizer = training.make_optimizer(training.TrainConfig(optimizer="muon"),
                                                0.01, model)
            if "muonf32" in options:
                optimizer.newton_schulz_dtype = "float32"
        model.compile(optimizer=optimizer,
                      loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                      jit_compile="xla" in options)
        rng = np.random.default_rng(0)
        n = args.batch_size * args.steps
        x = rng.integers(0, 256, (n, 32, 32, 3)).astype("float32")
        y = np.eye(10, dtype="float32")[rng.integers(0, 10, n)]
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch_size).cache().repeat()
        model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)  # trace / compile
        keras.mixed_precision.set_global_policy("float32")
        return model, ds

    built = {s: build(s) for s in settings}
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
    return {"device": "GPU" if tf.config.list_physical_devices("GPU") else "CPU",
            "batch_size": args.batch_size, "steps": args.steps,
            "img_s_median": {s: round(statistics.median(v), 1) for s, v in runs.items()},
            "img_s_runs": {s: [round(x, 1) for x in v] for s, v in runs.items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["tensorflow", "jax"],
                        help="side by side with PyTorch under this Keras backend")
    parser.add_argument("--settings", default="float32,float32+xla,bfloat16",
                        help="without --backend: comma-separated float32 | bfloat16 | "
                        "float16, optional +xla and +kerasbn (Keras's BatchNorm instead of "
                        "the fused one; TensorFlow backend)")
    parser.add_argument("--model", default="resnet18",
                        help="a name of keras_resnet.MODELS, built with the CIFAR stem (the "
                        "same network on the PyTorch side)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="training steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3,
                        help="--backend: steps of the first (tracing / compiling) call")
    parser.add_argument("--precision", default="match",
                        help="--backend: the Keras side's (a --precision of the training "
                        "script); match = PyTorch's: bfloat16 on a GPU, else float32")
    parser.add_argument("--torch-compile", default="auto", choices=["auto", "on", "off"],
                        help="auto = on with a GPU")
    parser.add_argument("--epochs", type=int, default=0,
                        help="--backend: then train this many epochs on --data-dir and score")
    parser.add_argument("--data-dir", help="image folder root/{train,test}/<class>/*")
    parser.add_argument("--max-train-images", type=int)
    parser.add_argument("--max-eval-images", type=int)
    parser.add_argument("--keras-env", action="append", default=[], metavar="NAME=VALUE",
                        help="--backend: also time the Keras side with this environment "
                        "variable set, as a further side in the same rounds (e.g. "
                        "TF_ENABLE_ONEDNN_OPTS=0); repeatable")
    parser.add_argument("--worker", choices=["keras", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-args", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return serve(args.worker, json.loads(args.worker_args))
    for name in ("batch_size", "steps", "rounds", "warmup"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be >= 1")
    for setting in args.keras_env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", setting):
            parser.error(f"--keras-env: got {setting!r}; expected NAME=VALUE")
    if args.keras_env and not args.backend:
        parser.error("--keras-env: needs --backend (the side-by-side mode)")
    if args.epochs and not args.data_dir:
        parser.error("--epochs: needs --data-dir (the images to train and score on)")
    if args.data_dir and not os.path.isdir(os.path.join(args.data_dir, "train")):
        parser.error(f"--data-dir: {args.data_dir!r} has no train/ folder")
    if args.backend:  # the parent imports neither Keras nor TensorFlow: workers start now
        result = side_by_side(args)
    else:
        from keras_resnet.benchmark import machine

        result = {**settings_mode(args), "machine": machine()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
