"""keras_resnet: the ResNet family for Keras 3, with data, training and export."""

import os

# Quiet TensorFlow's C++ start-up logging unless the user asked for it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow turns its oneDNN kernels on by default only on CPUs with AVX512-VNNI,
# AVX512-BF16 or AMX; on others (the AVX2-only EPYC) convolutions run on Eigen kernels
# built without AVX2 / FMA, and ResNet18 trained 2.5x slower (docs/benchmarks.md).
# TensorFlow reads this once as it loads: import keras_resnet before keras / tensorflow.
# A value the user set wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

# Registers the custom augmentation layer, so saved models holding it load.
from keras_resnet.augment import RandomPadCrop
from keras_resnet.model import (
    MODELS,
    RESNET_SPECS,
    basic_block,
    bottleneck_block,
    build_classifier,
    build_model,
    build_resnet,
    build_resnet18,
    build_resnet34,
    build_resnet50,
    build_resnet101,
    build_resnet152,
    resnet_stem,
    stage,
)
from keras_resnet.weights import save_torch_weights

__version__ = "0.1.0"
__all__ = [
    "MODELS", "RESNET_SPECS", "RandomPadCrop", "basic_block", "bottleneck_block", "build_classifier",
    "build_model",
    "build_resnet", "build_resnet18", "build_resnet34", "build_resnet50",
    "build_resnet101", "build_resnet152", "resnet_stem", "save_torch_weights", "stage",
]
