"""keras_resnet: the ResNet family for Keras 3, with data, training and export."""

# First: the environment TensorFlow reads as it loads (oneDNN on, log level), then
# Keras with TensorFlow's start-up log lines held to that level. Import keras_resnet
# before keras / tensorflow.
from keras_resnet import startup

startup.import_keras()

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
