"""Compare ResNet18/34/50 with MobileNetV2, EfficientNetB0, DenseNet121, VGG16, a small CNN."""

from keras_resnet.cli import compare_main

if __name__ == "__main__":
    compare_main()
