"""Classify images with a .keras, SavedModel or .tflite model: top-k labels."""

from keras_resnet.cli import predict_main

if __name__ == "__main__":
    predict_main()
