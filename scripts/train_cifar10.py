"""Train a ResNet on CIFAR-10; `--help` lists every hyperparameter and its default."""

from keras_resnet.cli import train_main

if __name__ == "__main__":
    train_main()
