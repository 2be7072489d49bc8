"""Command-line entry points; the scripts in ``scripts/`` call these."""

import argparse
import os


def demo_main(argv=None):
    """Build a ResNet, print its summary and run one forward pass."""
    import numpy as np

    from keras_resnet.model import MODELS, STEMS, build_model

    parser = argparse.ArgumentParser(description=demo_main.__doc__)
    parser.add_argument("--model", default="resnet18", choices=list(MODELS))
    parser.add_argument("--stem", default="cifar", choices=STEMS)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args(argv)
    model = build_model(args.model, stem=args.stem, classes=args.classes,
                        input_shape=(args.image_size, args.image_size, 3))
    model.summary()
    x = np.random.default_rng(0).uniform(size=(2, args.image_size, args.image_size, 3))
    probs = model.predict(x.astype("float32"), verbose=0)
    print(f"forward pass: input {x.shape} -> output {probs.shape}, "
          f"rows sum to {probs.sum(axis=1).round(4).tolist()}")


def _config_parser(cls, description):
    """argparse flags generated from the fields of a config dataclass.

    Flags have no argparse default (``SUPPRESS``): only the flags a user typed
    appear in the parsed namespace, so a typed flag wins even when its value
    equals the field's default. The help text shows each field's default.
    """
    import dataclasses
    import typing

    parser = argparse.ArgumentParser(description=description)
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        help_text = f"default: {field.default}"
        if field.name in comments:
            help_text = f"{comments[field.name]} ({help_text})".replace("%", "%%")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            parser.add_argument(flag, type=base, default=argparse.SUPPRESS,
                                metavar=field.name.upper(), help=help_text)
    return parser


def _field_comments(cls):
    """{field: the comment beside it in the class's source}, continued on the ``#``
    lines below it, the subclass's over its base's: the config dataclasses are the one
    place each setting is explained, and ``--help`` shows it."""
    import inspect
    import re

    comments = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):  # no source (a .pyc-only install): defaults alone
            continue
        name = None
        for line in lines:
            field = re.match(r" {4}(\w+): [^=]+= .*?#\s*(.*)$", line)
            more = re.match(r" {4}# {10,}(\S.*)$", line)
            if field:
                name, comments[field[1]] = field[1], field[2].strip()
            elif more and name:
                comments[name] += " " + more[1].strip()
            else:
                name = None
    return comments


def _fail(message):
    import sys

    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


PRESETS = ("recipe", "baseline", "smoke")


def _check_type(cls, key, value, config_file):
    """A ``--config`` value must have its field's type (JSON has no tuples or paths)."""
    import typing

    from keras_resnet.training import fits_type

    kind = typing.get_type_hints(cls)[key]
    allowed = typing.get_args(kind) or (kind,)
    if not fits_type(value, kind):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ValueError(f"--config: {key!r} in {config_file!r} is {_json_type(value)} "
                         f"{value!r}; must be {names}")


def _json_type(value):
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object", type(None): "null"}.get(type(value), "a value")


def resolve_train_config(argv=None, cls=None):
    """The config of a command line: preset < ``--config`` file < typed flags.

    ``cls`` is ``TrainConfig`` (the default; with ``--preset``) or
    ``FinetuneConfig`` (its defaults are the starting point).

    Raises:
        ValueError: the ``--config`` file cannot be read, is not a JSON object,
            or names a key that is not a config field.
    """
    return _resolve(argv, cls)[0]


def _resolve(argv, cls=None, add_arguments=None, defaults=None, description=None):
    """``resolve_train_config`` for a command with more flags: ``add_arguments(parser)``
    adds them, ``defaults`` replace config defaults; returns (config, the other flags)."""
    import dataclasses
    import json

    from keras_resnet import training

    cls = cls or training.TrainConfig
    finetuning = cls is training.FinetuneConfig
    parser = _config_parser(cls, description or (finetune_main if finetuning
                                                 else train_main).__doc__)
    extra = set()
    if add_arguments:
        before = {a.dest for a in parser._actions}
        add_arguments(parser)
        extra = {a.dest for a in parser._actions} - before
    if not finetuning:
        parser.add_argument("--preset", choices=PRESETS, default="recipe",
                            help="starting point (default: recipe); --config and typed "
                            "flags override it")
    parser.add_argument("--config", help="JSON file of config fields; overrides the "
                        "defaults, typed flags override it")
    args = vars(parser.parse_args(argv))
    others = {k: args.pop(k) for k in extra}
    preset, config_file = args.pop("preset", None), args.pop("config")
    values = dataclasses.asdict({None: cls, "recipe": training.TrainConfig,
                                 "baseline": training.baseline_config,
                                 "smoke": training.smoke_config}[preset]())
    values.update(defaults or {})
    if config_file:
        try:
            with open(config_file) as f:
                from_file = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"--config: cannot read {config_file!r}: {e}") from None
        if not isinstance(from_file, dict):
            raise ValueError(f"--config: {config_file!r} must hold a JSON object of config "
                             "fields")
        unknown = sorted(set(from_file) - set(values))
        if unknown:
            raise ValueError(f"--config: unknown key(s) {', '.join(map(repr, unknown))} in "
                             f"{config_file!r}; allowed: {', '.join(values)}")
        for key, value in from_file.items():
            _check_type(cls, key, value, config_file)
        values.update(from_file)
    values.update(args)  # only the flags the user typed are in args
    return cls(**values), others


def _write_failure(error, output_dir):
    """One message for a write that failed mid-run (a full disk, most often)."""
    where = error.filename or output_dir
    return (f"cannot write {where!r}: {error.strerror or error}. The last whole checkpoint "
            f"in {os.path.join(output_dir, 'backup')} is kept: free some space and run the "
            "same command again to resume")


def train_main(argv=None):
    """Train a ResNet on CIFAR-10 (tfds or an image folder); resumable."""
    import json

    from keras_resnet import training

    try:
        config = resolve_train_config(argv)
        config.validate()
        report = training.train(config)
    except (ValueError, TypeError) as e:
        _fail(str(e))
    except OSError as e:  # a full disk or a vanished folder during the run
        _fail(_write_failure(e, config.output_dir))
    summary = {k: v for k, v in report.items() if k != "confusion_matrix"}
    print(json.dumps(summary))


def finetune_main(argv=None):
    """Fine-tune pretrained weights on an image folder (linear, top or full); resumable."""
    import json

    from keras_resnet import training

    try:
        config = resolve_train_config(argv, training.FinetuneConfig)
        config.validate()
        report = training.train(config)  # a FinetuneConfig: weights, modes
    except (ValueError, TypeError) as e:
        _fail(str(e))
    except OSError as e:
        _fail(_write_failure(e, config.output_dir))
    summary = {k: v for k, v in report.items() if k != "confusion_matrix"}
    print(json.dumps(summary))


def tune_main(argv=None):
    """Search training hyperparameters with KerasTuner (grid, random, Bayesian,
    Hyperband); every training flag is the fixed part of each trial; resumable."""
    import json

    from keras_resnet import tuning

    def add_arguments(parser):
        parser.add_argument("--space", help="JSON file: {field: {log|float|int: [low, high]"
                            "[, step]} or {choice: [...]}}; default: "
                            f"{json.dumps(tuning.DEFAULT_SPACE)}")
        parser.add_argument("--tuner", default="bayesian", choices=tuning.TUNERS)
        parser.add_argument("--max-trials", type=int, default=12,
                            help="default: 12 (hyperband: set by --epochs, its max epochs)")

    try:
        config, args = _resolve(argv, add_arguments=add_arguments,
                                defaults={"output_dir": "runs/tune"},
                                description=tune_main.__doc__)
        config.validate()
        rows = tuning.search(config, tuning.read_space(args["space"]), args["tuner"],
                             args["max_trials"])
    except (ValueError, TypeError) as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot write {e.filename or config.output_dir!r}: {e.strerror or e}; run "
              "the same command again to resume the search")
    except RuntimeError as e:  # KerasTuner: too many failed trials in a row
        _fail(f"search stopped: {str(e).strip().splitlines()[0]} (see "
              f"{os.path.join(config.output_dir, 'results.md')})")
    done = [r for r in rows if r["status"] == "COMPLETED"]
    if rows:
        best = max(done, key=lambda r: r[tuning.OBJECTIVE]) if done else None
        print(json.dumps({"trials": len(rows), "completed": len(done),
                          "best": best, "output_dir": config.output_dir}))


def time_to_accuracy_main(argv=None):
    """Train with the recipe (every training flag applies) and report the wall-clock
    seconds to reach validation top-1 targets, with the machine it ran on."""
    import json

    from keras_resnet import benchmark, training

    def add_arguments(parser):
        parser.add_argument("--targets", default="0.8,0.85",
                            help="validation top-1 targets, comma-separated (default 0.8,0.85)")

    try:
        config, args = _resolve(argv, add_arguments=add_arguments,
                                defaults={"output_dir": "runs/time_to_accuracy"},
                                description=time_to_accuracy_main.__doc__)
        try:
            targets = [float(t) for t in args["targets"].split(",")]
        except ValueError:
            targets = []
        if not targets or not all(0 < t <= 1 for t in targets):
            raise ValueError(f"--targets: got {args['targets']!r}; must be comma-separated "
                             "accuracies in (0, 1]")
        if config.validation_size == 0:  # None: a tenth of the training images
            raise ValueError("--validation-size: the targets are validation top-1; must be "
                             ">= 1")
        config.validate()
        report = training.train(config)
    except (ValueError, TypeError) as e:
        _fail(str(e))
    except OSError as e:
        _fail(_write_failure(e, config.output_dir))
    history = training.read_history(os.path.join(config.output_dir, "history.csv"))
    reached = benchmark.time_to_accuracy(history, targets)
    for target, hit in reached.items():
        print(f"val top-1 >= {target:.2f}: " + (
            f"{hit['seconds']:.0f} s (epoch {hit['epoch']})" if hit else
            f"not reached in {len(history.get('epoch', []))} epochs"))
    print(json.dumps({"time_to_accuracy": {str(t): h for t, h in reached.items()},
                      "test_top1": report.get("top1"), "epochs": config.epochs,
                      "backend": report["backend"], "device": benchmark.device(),
                      "machine": benchmark.machine(), "output_dir": config.output_dir}))


def _uint8_images(splits_ds, limit):
    import numpy as np

    pairs = [(x.numpy(), int(y)) for x, y in splits_ds.take(limit)]
    return (np.stack([p[0] for p in pairs]).astype("uint8"),
            np.asarray([p[1] for p in pairs]))


def export_main(argv=None):
    """Export a trained model to SavedModel / TFLite and check every artifact."""
    import json

    from keras_resnet import data, export, predict

    parser = argparse.ArgumentParser(description=export_main.__doc__)
    parser.add_argument("source", help="a .keras file or a training run directory")
    parser.add_argument("--output-dir", help="default: saved_models/<name>")
    parser.add_argument("--formats", help="comma-separated, of: "
                        f"{', '.join(export.ALL_FORMATS)}; default: {', '.join(export.FORMATS)}"
                        " (tflite_int8 only with --data-dir)")
    parser.add_argument("--data-dir", help="image folder root/<split>/<class>/*: held-out "
                        "images for the checks (test split) and calibration (train split)")
    parser.add_argument("--calibration-images", type=int, default=300)
    parser.add_argument("--check-images", type=int, default=1000)
    parser.add_argument("--int8-io", choices=["uint8", "int8"], default="uint8",
                        help="input / output type of the full-integer model")
    parser.add_argument("--winograd", action="store_true",
                        help=f"also write {export.ARTIFACT_NAMES[export.WINOGRAD]}: float32 "
                        "with Winograd 3x3 convs (faster on x86 CPUs, 1.67x the file size)")
    parser.add_argument("--tta-flip", choices=["auto", "on", "off"], default="auto",
                        help="flip test-time augmentation inside the artifacts (two passes "
                        "per image); auto: as the run scored its test set")
    parser.add_argument("--tta-shift", default="auto", metavar="PIXELS",
                        help="test-time views also shifted by +/- PIXELS (3x the passes); "
                        "auto: as the run scored its test set")
    args = parser.parse_args(argv)
    if args.formats is None:
        formats = [f for f in export.FORMATS if args.data_dir or f != "tflite_int8"]
        if not args.data_dir:
            print("note: tflite_int8 skipped: it needs --data-dir for calibration")
    else:
        formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if args.winograd and export.WINOGRAD not in formats:
        formats.append(export.WINOGRAD)
    try:
        bad = [f for f in formats if f not in export.ALL_FORMATS]
        if bad or not formats:
            raise ValueError(f"--formats: got {bad or args.formats!r}; allowed: "
                             f"{', '.join(export.ALL_FORMATS)}")
        if "tflite_int8" in formats and not args.data_dir:
            raise ValueError("--formats tflite_int8 needs calibration images: pass "
                             "--data-dir (an image folder with a train/ split)")
        for name in ("calibration_images", "check_images"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1")
        if args.tta_shift != "auto" and not (
                args.tta_shift.isdigit() and int(args.tta_shift) <= predict.MAX_TTA_SHIFT):
            raise ValueError(f"--tta-shift: got {args.tta_shift!r}; must be auto or an "
                             f"integer in 0..{predict.MAX_TTA_SHIFT}")
        model, _model_path = predict.load_source(args.source)
        scored_flip, scored_shift = predict.scored_tta(_model_path)
        tta_flip = args.tta_flip == "on" or (args.tta_flip == "auto" and scored_flip)
        tta_shift = scored_shift if args.tta_shift == "auto" else int(args.tta_shift)
        name = model.name
        output_dir = args.output_dir or os.path.join("saved_models", name)
        from keras_resnet.training import check_output_dir

        check_output_dir(output_dir, "--output-dir")
        predict.input_size(model, _model_path)  # an image model, or a clear message
        images = labels = calibration = None
        class_names = None
        if args.data_dir:
            splits = data.load_splits(data_dir=args.data_dir, validation_size=0,
                                      max_train_images=args.calibration_images,
                                      max_eval_images=args.check_images,
                                      image_size=predict.input_size(model),
                                      eval_crop_ratio=predict.read_crop_ratio(_model_path))
            held_out = splits.test if splits.test is not None else splits.validation
            if held_out is None:
                raise ValueError(f"--data-dir: {args.data_dir!r} has no test/ or val/ split "
                                 "for the checks")
            images, labels = _uint8_images(held_out, args.check_images)
            calibration, _ = _uint8_images(splits.train, args.calibration_images)
            class_names = splits.class_names
        report = export.export(args.source, output_dir, formats, images=images, labels=labels,
                               calibration=calibration, int8_io=args.int8_io,
                               class_names=class_names, tta_flip=tta_flip,
                               tta_shift=tta_shift)
    except ValueError as e:
        _fail(str(e))
    except OSError as e:  # a full disk: the artifacts written before it are whole
        _fail(f"cannot write {e.filename or output_dir!r}: {e.strerror or e}; nothing "
              f"half-written is left in {output_dir!r}: free some space and run it again")
    print(f"{'artifact':22} {'size MB':>8} {'max|dp|':>9} {'agree':>6} {'top1':>6} "
          f"{'keras':>6}  target")
    for fmt, r in report["artifacts"].items():
        print(f"{fmt:22} {r['size_bytes'] / 1e6:8.2f} {r['max_abs_diff']:9.2e} "
              f"{r['top1_agreement']:6.3f} {r['top1_accuracy']:6.3f} "
              f"{r['keras_top1_accuracy']:6.3f}  {'ok' if r['passed'] else 'MISSED'}: "
              f"{r['target']}")
    rewritten = report["artifacts"].get(export.WINOGRAD, {}).get("winograd_convs")
    if rewritten:
        print(f"{export.WINOGRAD}: {len(rewritten)} 3x3 convs computed by Winograd")
    if report["tta_views"] > 1:
        views = ("the image" + (" and its mirror" if tta_flip else "") +
                 (f", each also shifted by +/-{tta_shift} px" if tta_shift else ""))
        print(f"tta: every artifact averages {report['tta_views']} views: {views}")
    print(f"report: {os.path.join(output_dir, 'export_report.json')}")
    print(json.dumps({fmt: r["path"] for fmt, r in report["artifacts"].items()}))


def predict_main(argv=None):
    """Classify image files or folders with a .keras, SavedModel or .tflite model."""
    import json
    import sys

    import numpy as np

    from keras_resnet import predict
    from keras_resnet.sources import scan_images

    parser = argparse.ArgumentParser(description=predict_main.__doc__)
    parser.add_argument("model", help=".keras file, run directory, SavedModel directory "
                        "or .tflite file")
    parser.add_argument("paths", nargs="+", help="image files or folders of images")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="one JSON line per image")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images decoded (in parallel) and classified per call")
    args = parser.parse_args(argv)
    try:
        if args.top_k < 1:
            raise ValueError(f"--top-k: got {args.top_k}; must be >= 1")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size: got {args.batch_size}; must be >= 1")
        files, skipped = [], 0
        for path in args.paths:
            if os.path.isdir(path):
                found = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                               if not f.startswith("."))
                if not found:
                    raise ValueError(f"PATH: folder {path!r} holds no files")
                readable = [f for f, ok in zip(found, scan_images(found), strict=True)
                            if ok is not None]
                skipped += len(found) - len(readable)  # a folder may hold other files
                files += readable
            elif os.path.isfile(path):
                if scan_images([path])[0] is None:
                    raise ValueError(f"PATH: not a readable image: {path}")
                files.append(path)
            else:
                raise ValueError(f"PATH: {path!r} does not exist")
        if not files:
            raise ValueError(f"PATH: no readable image in {', '.join(args.paths)}")
        predictor, size, names, crop_ratio = predict.load_predictor(args.model)
        num_classes = predictor(np.zeros((1, *size, 3), np.uint8)).shape[-1]
        if names and len(names) != num_classes:
            raise ValueError(f"MODEL: the labels.txt beside {args.model!r} names {len(names)} "
                             f"classes, the model predicts {num_classes}; fix or remove it")
    except ValueError as e:
        _fail(str(e))
    if skipped:
        print(f"note: skipped {skipped} file(s) in the folders that are not readable images",
              file=sys.stderr)
    k = min(args.top_k, 1000)
    # Decoded in parallel and classified in batches; a file that passed the scan but does
    # not decode is dropped with its path (and counted).
    done = 0
    for paths, images in predict.image_batches(files, size, crop_ratio, args.batch_size):
        probs = predictor(images)
        for path, row in zip(paths, probs, strict=True):
            done += 1
            if not np.all(np.isfinite(row)):
                print(f"warning: {path}: the model's outputs are not finite (NaN): it is "
                      "broken (e.g. trained with a NaN loss)", file=sys.stderr)
            top = np.argsort(-row)[:k]
            pairs = [[names[i] if names else str(i), round(float(row[i]), 6)] for i in top]
            if args.json:
                print(json.dumps({"path": path, "top_k": pairs}))
            else:
                print(f"{path}: " + ", ".join(f"{n} {p:.4f}" for n, p in pairs))
    if done < len(files):
        print(f"note: {len(files) - done} file(s) did not decode and were skipped",
              file=sys.stderr)


def compare_main(argv=None):
    """Compare ResNet18/34/50 with other CNNs: size, FLOPs, speed, accuracy."""
    from keras_resnet import compare

    defaults = compare.CompareConfig()
    parser = argparse.ArgumentParser(description=compare_main.__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", default=",".join(defaults.models),
                        help="comma-separated names")
    parser.add_argument("--data-dir", help="image folder root/<split>/<class>/* "
                        "(default: tfds cifar10)")
    parser.add_argument("--output-dir", default=defaults.output_dir)
    for name in ("epochs", "train_images", "eval_images", "batch_size", "latency_runs",
                 "seed"):
        parser.add_argument("--" + name.replace("_", "-"), type=int,
                            default=getattr(defaults, name))
    parser.add_argument("--lr", type=float, default=defaults.lr)
    args = parser.parse_args(argv)
    values = vars(args)
    values["models"] = tuple(m.strip() for m in args.models.split(",") if m.strip())
    try:
        config = compare.CompareConfig(**values)
        config.validate()
        _, table = compare.compare(config)
    except ValueError as e:
        _fail(str(e))
    print(table)
    print(f"written: {args.output_dir}/results.csv, results.md, accuracy_vs_latency.png, "
          "accuracy_vs_params.png")
