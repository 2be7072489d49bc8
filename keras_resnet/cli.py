"""Command-line entry points; the scripts in ``scripts/`` call these."""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def demo_main(argv=None):
    """Build a ResNet, print its summary and run one forward pass."""
    import numpy as np

    from keras_resnet.model import MODELS, build_model

    parser = argparse.ArgumentParser(description=demo_main.__doc__)
    parser.add_argument("--model", default="resnet18", choices=list(MODELS))
    parser.add_argument("--stem", default="cifar", choices=["imagenet", "cifar", "deep"])
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
    """argparse flags generated from the fields of a config dataclass."""
    import dataclasses
    import typing

    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                default=field.default)
        else:
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            parser.add_argument(flag, type=base, default=field.default, metavar=field.name.upper())
    return parser


def _fail(message):
    import sys

    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def train_main(argv=None):
    """Train a ResNet on CIFAR-10 (tfds or an image folder); resumable."""
    import dataclasses
    import json

    from keras_resnet import training

    parser = _config_parser(training.TrainConfig, train_main.__doc__)
    parser.add_argument("--preset", choices=["recipe", "baseline", "smoke"], default="recipe",
                        help="starting point; flags given explicitly override it")
    parser.add_argument("--config", help="JSON file of config fields (flags override it)")
    args = parser.parse_args(argv)
    base = {"recipe": training.TrainConfig, "baseline": training.baseline_config,
            "smoke": training.smoke_config}[args.preset]()
    values = dataclasses.asdict(base)
    if args.config:
        try:
            with open(args.config) as f:
                values.update(json.load(f))
        except (OSError, ValueError) as e:
            _fail(f"--config: cannot read {args.config!r}: {e}")
    defaults = vars(parser.parse_args([]))
    for key, value in vars(args).items():
        if key in values and value != defaults[key]:
            values[key] = value
    try:
        config = training.TrainConfig(**values)
        config.validate()
        report = training.train(config)
    except (ValueError, TypeError) as e:
        _fail(str(e))
    summary = {k: v for k, v in report.items() if k != "confusion_matrix"}
    print(json.dumps(summary))
