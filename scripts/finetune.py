"""Fine-tune pretrained weights on an image folder; `--help` lists every setting and its default."""

from keras_resnet.cli import finetune_main

if __name__ == "__main__":
    finetune_main()
