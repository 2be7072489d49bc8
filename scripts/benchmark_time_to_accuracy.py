"""Wall-clock seconds to reach validation top-1 targets (default 80 % and 85 %) with the
training recipe, and the machine it ran on; `--help` lists every setting."""

from keras_resnet.cli import time_to_accuracy_main

if __name__ == "__main__":
    time_to_accuracy_main()
