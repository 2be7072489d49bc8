"""Bad input, across every command line and the library API: each is refused with
a message that names the argument or file and what is allowed, without a Python
traceback, and nothing is written where the command would have written.

Each case fails before any training starts, so the module stays fast."""

import json
import os
import types
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import run_main, write_folder
from PIL import Image

import keras_resnet as K
from keras_resnet import cli, data, export, training, tuning, weights


@pytest.fixture(scope="module")
def p(tmp_path_factory):
    """Paths to good and bad inputs, made once."""
    root = tmp_path_factory.mktemp("bad")
    folder = write_folder(root / "data", per_class=4, size=16)
    one_class = write_folder(root / "one_class", per_class=4, size=16, classes=("cat",))
    no_images = root / "no_images" / "train" / "cat"
    no_images.mkdir(parents=True)
    (no_images / "notes.txt").write_text("text")
    (root / "no_images" / "train" / "dog").mkdir()
    corrupt = root / "corrupt" / "train"
    for c in ("cat", "dog"):
        (corrupt / c).mkdir(parents=True)
        (corrupt / c / "0.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    train_only = write_folder(root / "train_only", per_class=4, size=16)
    for f in (train_only / "test").rglob("*"):
        if f.is_file():
            f.unlink()
    for d in sorted((train_only / "test").rglob("*"), reverse=True):
        d.rmdir()
    (train_only / "test").rmdir()
    model = K.build_classifier(image_size=(16, 16), num_classes=3, mean=(0, 0, 0),
                               std=(1, 1, 1), stem="cifar")
    model.save(root / "model.keras")
    run = root / "run"
    run.mkdir()
    model.save(run / "best.keras")
    (run / "labels.txt").write_text("cat\ndog\n")
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(root / "dense.keras")
    (root / "notes.keras").write_text("hello")
    (root / "garbage.pth").write_bytes(bytes(range(256)) * 4)
    (root / "notes.txt").write_text("text")
    (root / "bad.tflite").write_bytes(b"nope")
    (root / "fake_sm").mkdir()
    (root / "fake_sm" / "saved_model.pb").write_bytes(b"not a protobuf")
    (root / "empty").mkdir()
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xffnot really")
    (root / "a_file").write_text("x")
    weights.save_torch_weights(K.build_resnet18(include_top=False), root / "r18.safetensors")
    for name, text in {"list.json": "[1, 2]", "null.json": "null", "broken.json": "{lr: 1",
                       "milestones.json": '{"step_milestones": 0.5}',
                       "unknown.json": '{"learning_rate": 0.1}',
                       "epochs.json": '{"epochs": "3"}', "flag.json": '{"crop_flip": 1}',
                       "space_unknown.json": '{"lr_max": {"log": [0.1, 1]}}',
                       "space_inverted.json": '{"lr": {"float": [1, 0.1]}}'}.items():
        (root / name).write_text(text)
    return types.SimpleNamespace(root=root, folder=folder, one_class=one_class,
                                 no_images=root / "no_images", corrupt=root / "corrupt",
                                 train_only=train_only, out=root / "out",
                                 image=folder / "test" / "cat" / "0.jpg")


def smoke(p, *more):
    return ["--preset", "smoke", "--data-dir", p.folder, "--output-dir", p.out, *more]


def tune(p, *more):
    return [*smoke(p), "--validation-size", "4", *more]


def ft(p, *more):
    return ["--data-dir", p.folder, "--output-dir", p.out, "--image-size", "16", *more]


def exp(p, *more):
    return [p.root / "model.keras", "--output-dir", p.out, *more]


# (id, entry point, argv from the paths, strings the message must hold)
CLI_CASES = [
    # train_cifar10.py: flags
    ("train-epochs", cli.train_main, lambda p: smoke(p, "--epochs", "0"),
     ["epochs: got 0", "an integer >= 1"]),
    ("train-batch", cli.train_main, lambda p: smoke(p, "--batch-size", "-3"),
     ["batch_size: got -3", ">= 1"]),
    ("train-optimizer", cli.train_main, lambda p: smoke(p, "--optimizer", "lion"),
     ["optimizer: got 'lion'", "one of sgd, nesterov"]),
    ("train-lr", cli.train_main, lambda p: smoke(p, "--lr", "0"), ["lr: got 0.0", "> 0"]),
    ("train-momentum", cli.train_main, lambda p: smoke(p, "--momentum", "1"),
     ["momentum: got 1.0", "in [0, 1)"]),
    ("train-schedule", cli.train_main, lambda p: smoke(p, "--schedule", "exponential"),
     ["schedule: got 'exponential'", "one of constant, step, cosine, onecycle, linear"]),
    ("train-milestones", cli.train_main, lambda p: smoke(p, "--step-milestones", "0.5,2"),
     ["step_milestones: got '0.5,2'", "fractions of the run in (0, 1)"]),
    ("train-precision", cli.train_main, lambda p: smoke(p, "--precision", "fp8"),
     ["precision: got 'fp8'", "auto, float32, bfloat16, float16"]),
    ("train-crop-scale", cli.train_main, lambda p: smoke(p, "--crop-scale", "0.5"),
     ["crop_scale: got '0.5'", "two numbers 'low,high'"]),
    ("train-image-size", cli.train_main, lambda p: smoke(p, "--image-size", "4"),
     ["image_size: got 4", ">= 8"]),
    ("train-eval-crop", cli.train_main, lambda p: smoke(p, "--eval-crop-ratio", "1.5"),
     ["eval_crop_ratio: got 1.5", "in (0, 1]"]),
    ("train-model", cli.train_main, lambda p: smoke(p, "--model", "resnet19"),
     ["model: got 'resnet19'", "resnet18, resnet34"]),
    ("train-int-flag", cli.train_main, lambda p: smoke(p, "--epochs", "abc"),
     ["argument --epochs", "invalid int value: 'abc'"]),
    ("train-strategy", cli.train_main, lambda p: smoke(p, "--strategy", "tpu"),
     ["strategy: got 'tpu'", "default, mirrored, multiworker"]),
    # train_cifar10.py: --config files
    ("config-missing", cli.train_main, lambda p: smoke(p, "--config", p.root / "none.json"),
     ["--config: cannot read", "none.json"]),
    ("config-broken", cli.train_main, lambda p: smoke(p, "--config", p.root / "broken.json"),
     ["--config: cannot read", "broken.json"]),
    ("config-list", cli.train_main, lambda p: smoke(p, "--config", p.root / "list.json"),
     ["list.json", "must hold a JSON object of config fields"]),
    ("config-null", cli.train_main, lambda p: smoke(p, "--config", p.root / "null.json"),
     ["null.json", "must hold a JSON object"]),
    ("config-type", cli.train_main, lambda p: smoke(p, "--config", p.root / "milestones.json"),
     ["'step_milestones'", "is a number 0.5; must be str"]),
    ("config-unknown", cli.train_main, lambda p: smoke(p, "--config", p.root / "unknown.json"),
     ["unknown key(s) 'learning_rate'", "allowed: model, stem"]),
    ("config-string-int", cli.train_main, lambda p: smoke(p, "--config",
                                                          p.root / "epochs.json"),
     ["'epochs'", "is a string '3'; must be int"]),
    ("config-bool", cli.train_main, lambda p: smoke(p, "--config", p.root / "flag.json"),
     ["'crop_flip'", "must be bool"]),
    # train_cifar10.py: data folders and the output directory
    ("data-missing", cli.train_main, lambda p: [*smoke(p), "--data-dir", p.root / "nowhere"],
     ["data_dir:", "nowhere", "is not a directory (expected an image folder"]),
    ("data-one-class", cli.train_main, lambda p: [*smoke(p), "--data-dir", p.one_class],
     ["one_class", "has images of 1 class; a classifier needs at least 2"]),
    ("data-no-images", cli.train_main, lambda p: [*smoke(p), "--data-dir", p.no_images],
     ["no_images", "no image files (.jpg"]),
    ("data-all-corrupt", cli.train_main, lambda p: [*smoke(p), "--data-dir", p.corrupt,
                                                    "--validation-size", "0"],
     ["no readable images under", "corrupt"]),
    ("data-validation", cli.train_main, lambda p: smoke(p, "--validation-size", "500"),
     ["validation_size: 500 leaves no training images"]),
    ("data-batch", cli.train_main, lambda p: smoke(p, "--validation-size", "2",
                                                   "--batch-size", "500"),
     ["batch_size: global batch 500 is larger than the"]),
    ("output-under-file", cli.train_main, lambda p: [*smoke(p), "--output-dir",
                                                     p.root / "a_file" / "run"],
     ["output_dir: cannot write to", "a_file"]),
    # finetune.py
    ("ft-no-data", cli.finetune_main, lambda p: ["--output-dir", p.out],
     ["data_dir: fine-tuning needs an image folder"]),
    ("ft-weights-missing", cli.finetune_main, lambda p: ft(p, "--weights",
                                                           p.root / "nope.pth"),
     ["weights:", "nope.pth", "neither 'imagenet', a weights file nor a run directory"]),
    ("ft-weights-kind", cli.finetune_main, lambda p: ft(p, "--weights", p.root / "notes.txt"),
     ["weights:", "notes.txt", "must be 'imagenet', a PyTorch checkpoint (.pth"]),
    ("ft-weights-garbage", cli.finetune_main, lambda p: ft(p, "--weights",
                                                           p.root / "garbage.pth"),
     ["garbage.pth", "is not a PyTorch checkpoint in torch.save's zip format"]),
    ("ft-weights-other-arch", cli.finetune_main, lambda p: ft(
        p, "--weights", p.root / "r18.safetensors", "--model", "resnet34"),
     ["r18.safetensors", "does not fit 'resnet34'", "no weights for layer"]),
    ("ft-weights-not-keras", cli.finetune_main, lambda p: ft(p, "--weights",
                                                             p.root / "notes.keras"),
     ["notes.keras", "is not a Keras model file"]),
    ("ft-weights-dense", cli.finetune_main, lambda p: ft(p, "--weights",
                                                         p.root / "dense.keras"),
     ["dense.keras", "is not a keras_resnet classifier (no 'normalize' layer)"]),
    ("ft-mode", cli.finetune_main, lambda p: ft(p, "--mode", "partial"),
     ["mode: got 'partial'", "one of linear, top, full"]),
    ("ft-stages", cli.finetune_main, lambda p: ft(p, "--mode", "top", "--unfreeze-stages", "5"),
     ["unfreeze_stages: got 5", "an integer in 1..4"]),
    ("ft-head-epochs", cli.finetune_main, lambda p: ft(p, "--epochs", "2", "--head-epochs",
                                                       "2"),
     ["head_epochs: got 2", "an integer in [0, epochs)"]),
    ("ft-lr-scale", cli.finetune_main, lambda p: ft(p, "--backbone-lr-scale", "2"),
     ["backbone_lr_scale: got 2.0", "in (0, 1]"]),
    # tune.py
    ("tune-space-field", cli.tune_main, lambda p: tune(p, "--space",
                                                       p.root / "space_unknown.json"),
     ["--space: 'lr_max' is not a config field", "searchable: model"]),
    ("tune-space-range", cli.tune_main, lambda p: tune(p, "--space",
                                                       p.root / "space_inverted.json"),
     ["--space: 'lr'", "empty or inverted; low must be < high"]),
    ("tune-grid", cli.tune_main, lambda p: tune(p, "--tuner", "grid", "--max-trials", "5"),
     ["max_trials:", "the grid has 75 points", "pass --max-trials 75"]),
    ("tune-tuner", cli.tune_main, lambda p: tune(p, "--tuner", "annealing"),
     ["argument --tuner", "invalid choice: 'annealing'"]),
    # export_model.py
    ("export-missing", cli.export_main, lambda p: [p.root / "none.keras", "--output-dir", p.out],
     ["SOURCE:", "none.keras", "neither a .keras file nor a run directory"]),
    ("export-not-keras", cli.export_main, lambda p: [p.root / "notes.keras", "--output-dir",
                                                      p.out],
     ["notes.keras", "is not a Keras model file"]),
    ("export-dense", cli.export_main, lambda p: [p.root / "dense.keras", "--output-dir", p.out],
     ["dense.keras", "is not an image classifier: its input is (None, 4)"]),
    ("export-formats", cli.export_main, lambda p: exp(p, "--formats", "onnx"),
     ["--formats: got ['onnx']", "allowed: saved_model, tflite_float32"]),
    ("export-int8", cli.export_main, lambda p: exp(p, "--formats", "tflite_int8"),
     ["--formats tflite_int8 needs calibration images", "--data-dir"]),
    ("export-calibration", cli.export_main, lambda p: exp(p, "--calibration-images", "0"),
     ["--calibration-images: must be >= 1"]),
    ("export-output", cli.export_main, lambda p: [p.root / "model.keras", "--output-dir",
                                                   p.root / "a_file" / "out"],
     ["--output-dir: cannot write to", "a_file"]),
    ("export-no-test", cli.export_main, lambda p: exp(p, "--data-dir", p.train_only),
     ["--data-dir:", "train_only", "has no test/ or val/ split"]),
    ("export-int8-io", cli.export_main, lambda p: exp(p, "--int8-io", "float"),
     ["argument --int8-io", "invalid choice: 'float'"]),
    # predict.py (writes nothing by design)
    ("predict-model", cli.predict_main, lambda p: [p.root / "none.keras", p.image],
     ["SOURCE:", "none.keras", "neither a .keras file nor a run directory"]),
    ("predict-tflite", cli.predict_main, lambda p: [p.root / "bad.tflite", p.image],
     ["MODEL:", "bad.tflite", "is not a valid .tflite file"]),
    ("predict-saved-model", cli.predict_main, lambda p: [p.root / "fake_sm", p.image],
     ["fake_sm", "is not a readable SavedModel"]),
    ("predict-top-k", cli.predict_main, lambda p: [p.root / "model.keras", p.image,
                                                   "--top-k", "0"],
     ["--top-k: got 0", "must be >= 1"]),
    ("predict-batch", cli.predict_main, lambda p: [p.root / "model.keras", p.image,
                                                   "--batch-size", "0"],
     ["--batch-size: got 0", "must be >= 1"]),
    ("predict-empty", cli.predict_main, lambda p: [p.root / "model.keras", p.root / "empty"],
     ["PATH: folder", "empty", "holds no files"]),
    ("predict-missing", cli.predict_main, lambda p: [p.root / "model.keras",
                                                     p.root / "gone.png"],
     ["PATH:", "gone.png", "does not exist"]),
    ("predict-broken", cli.predict_main, lambda p: [p.root / "model.keras",
                                                    p.root / "broken.jpg"],
     ["PATH: not a readable image", "broken.jpg"]),
    ("predict-labels", cli.predict_main, lambda p: [p.root / "run", p.image],
     ["labels.txt", "names 2 classes, the model predicts 3", "fix or remove it"]),
    # compare_models.py and the demo
    ("compare-models", cli.compare_main, lambda p: ["--models", "resnet18,vgg99",
                                                    "--output-dir", p.out],
     ["models: unknown ['vgg99']", "allowed: resnet18"]),
    ("compare-epochs", cli.compare_main, lambda p: ["--epochs", "0", "--output-dir", p.out],
     ["epochs: got 0", "an integer >= 1"]),
    ("compare-data", cli.compare_main, lambda p: ["--data-dir", p.root / "nowhere",
                                                  "--output-dir", p.out],
     ["data_dir:", "nowhere", "is not a directory"]),
    ("demo-model", cli.demo_main, lambda p: ["--model", "resnet19"],
     ["argument --model", "invalid choice: 'resnet19'"]),
]


@pytest.mark.parametrize("main, argv, expected", [c[1:] for c in CLI_CASES],
                         ids=[c[0] for c in CLI_CASES])
def test_bad_command_line_is_refused_clearly_and_writes_nothing(p, main, argv, expected):
    before = sorted(os.listdir(p.root))
    result = run_main(main, *argv(p))  # an uncaught exception would fail the test
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in result.stderr, (text, result.stderr[-2000:])
    assert not p.out.exists()
    assert sorted(os.listdir(p.root)) == before  # nothing written beside the inputs


# (id, call, the exception message's strings)
API_CASES = [
    ("build-weights-missing", lambda p: K.build_resnet18(weights=str(p.root / "nope.bin")),
     ["weights: file not found", "nope.bin", "'imagenet' or the path of a .pth"]),
    ("build-weights-kind", lambda p: weights.load_weights(K.build_resnet18(),
                                                         str(p.root / "bad.tflite")),
     ["bad.tflite", "must end in .pth, .pt, .bin, .safetensors, .weights.h5 or .keras"]),
    ("build-model-name", lambda p: K.build_model("resnet19"),
     ["model: got 'resnet19'", "allowed: resnet10t, resnet18"]),
    ("build-input", lambda p: K.build_resnet18(input_shape=(4, 4, 3)),
     ["input_shape: got (4, 4, 3)", "needs height and width >= 32"]),
    ("build-classes", lambda p: K.build_resnet18(classes=0),
     ["classes: got 0", "an integer >= 1"]),
    ("augment-crop", lambda p: data.AugmentConfig(crop="zoom"),
     ["augment.crop: got 'zoom'", "allowed: pad, resized"]),
    ("splits-cache", lambda p: data.load_splits(data_dir=str(p.folder), cache=3),
     ["cache: got 3", "allowed: auto, memory, none or a folder"]),
    ("splits-validation", lambda p: data.load_splits(data_dir=str(p.folder),
                                                     validation_size=-1),
     ["validation_size: got -1", "must be >= 0 or None"]),
    ("splits-crop", lambda p: data.load_splits(data_dir=str(p.folder), eval_crop_ratio=0),
     ["eval_crop_ratio: got 0", "must be in (0, 1]"]),
    ("splits-tfds", lambda p: data.load_splits("mnist"),
     ["dataset: got 'mnist'", "allowed: cifar10"]),
    ("config-validate", lambda p: training.TrainConfig(warmup_epochs=40).validate(),
     ["warmup_epochs: got 40", "in [0, epochs)"]),
    ("train-data", lambda p: training.train(training.smoke_config(
        data_dir=str(p.one_class), output_dir=str(p.out))),
     ["has images of 1 class"]),
    ("export-formats", lambda p: export.export(str(p.root / "model.keras"), str(p.out),
                                               ["formats: got ['png']", "allowed: saved_model"]),
     ["formats: got ['png']", "allowed: saved_model"]),
    ("tune-tuner", lambda p: tuning.search(training.smoke_config(
        data_dir=str(p.folder), output_dir=str(p.out)), tuner="annealing"),
     ["tuner: got 'annealing'", "grid, random, bayesian, hyperband"]),
]


@pytest.mark.parametrize("call, expected", [c[1:] for c in API_CASES],
                         ids=[c[0] for c in API_CASES])
def test_bad_library_call_raises_a_value_error_naming_the_argument(p, call, expected):
    with pytest.raises(ValueError) as e:
        call(p)
    for text in expected:
        assert text in str(e.value), (text, str(e.value))
    assert not p.out.exists()


def test_at_least_forty_bad_inputs_are_tried():
    assert len(CLI_CASES) + len(API_CASES) >= 40


def test_huge_and_bomb_images_in_a_training_folder_are_handled(tmp_path):
    """A 4000x4000 photo is decoded and resized; a decompression-bomb PNG is skipped
    (counted); training data loads."""
    root = write_folder(tmp_path / "data", per_class=4, size=16)
    Image.fromarray(np.full((4000, 4000, 3), 120, np.uint8)).save(
        root / "train" / "cat" / "big.jpg")
    Image.new("1", (14000, 14000)).save(root / "train" / "dog" / "bomb.png")  # 196 Mpx
    s = data.load_splits(data_dir=str(root), validation_size=0, image_size=16)
    assert s.num_train == 13 and s.report["train"]["skipped_unreadable"] == 1
    images = [x.numpy() for x, _ in s.train]
    assert len(images) == 13 and all(x.shape == (16, 16, 3) for x in images)
    assert json.dumps(s.report)  # the report is plain data


def test_writers_of_one_file_never_share_a_temporary_name(tmp_path):
    """The chief and workers of a search write the same search.json: each write goes
    through its own temporary file (a shared ``path.tmp`` let one writer rename away the
    file another was about to rename: FileNotFoundError)."""
    import threading

    from keras_resnet import atomic

    path = tmp_path / "search.json"
    errors = []

    def writer(n):
        try:
            for i in range(300):
                training.write_json(path, {"writer": n, "i": i})
        except Exception as e:  # noqa: BLE001 - collected, asserted below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads(path.read_text())["i"] == 299
    assert os.listdir(tmp_path) == ["search.json"]
    assert atomic.temp_path(path) != atomic.temp_path(path)
    assert atomic.temp_path(path, suffix=".png").endswith(".tmp.png")

    with pytest.raises(OSError), atomic.replacing(path) as tmp:  # the disk is full
        Path(tmp).write_text("half")
        raise OSError(28, "No space left on device")
    assert os.listdir(tmp_path) == ["search.json"]  # the old file, no temporary one left
    assert json.loads(path.read_text())["i"] == 299
