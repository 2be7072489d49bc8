"""Export a trained model to SavedModel / TFLite (float32, float16, int8), checked."""

from keras_resnet.cli import export_main

if __name__ == "__main__":
    export_main()
