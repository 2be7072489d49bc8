"""Search training hyperparameters with KerasTuner; `--help` lists every setting and its default."""

from keras_resnet.cli import tune_main

if __name__ == "__main__":
    tune_main()
