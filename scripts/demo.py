"""Build ResNet18 (CIFAR stem), print its summary and run a forward pass."""

from keras_resnet.cli import demo_main

if __name__ == "__main__":
    demo_main()
