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
