"""Transfer learning: the three modes freeze what they say, finetune.py end to end,
bad input refused before anything is written."""

import json
import os
import re
import shutil

import keras
import numpy as np
import pytest
from helpers import run_main, write_folder

from keras_resnet import build_classifier, cli
from keras_resnet import build_model as kr_build
from keras_resnet import training as T


def classifier():
    return build_classifier("resnet18", image_size=(32, 32), num_classes=3, mean=(0, 0, 0),
                            std=(1, 1, 1), stem="cifar")


def snapshot(model):
    return {v.path: np.array(v) for v in model.weights}


def one_step(model, optimizer=None):
    model.compile(optimizer or keras.optimizers.SGD(0.1), keras.losses.CategoricalCrossentropy(
        from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    y = keras.utils.to_categorical([0, 1, 2, 0], 3)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)


def changed(before, after, prefix):
    """Per variable under ``prefix``: did it change?"""
    return {k: not np.array_equal(before[k], after[k]) for k in before if k.startswith(prefix)}


@pytest.mark.parametrize("mode, stages, frozen, trained", [
    ("linear", 1, ["stem_", "stage1_", "stage4_"], ["predictions"]),
    ("top", 1, ["stem_", "stage3_"], ["stage4_", "predictions"]),
    ("top", 2, ["stem_", "stage2_"], ["stage3_", "stage4_", "predictions"]),
    ("full", 1, [], ["stem_", "stage1_", "stage4_", "predictions"]),
])
def test_modes_freeze_weights_and_batchnorm_statistics(mode, stages, frozen, trained):
    model = T.set_trainable(classifier(), mode, stages)
    before = snapshot(model)
    one_step(model)
    after = snapshot(model)
    for prefix in frozen:  # kernels, gamma / beta and moving mean / variance alike
        flags = changed(before, after, prefix)
        assert flags and not any(flags.values()), prefix
    for prefix in trained:
        flags = changed(before, after, prefix)
        assert any(v for k, v in flags.items() if k.endswith("kernel")), prefix
    if mode != "linear":
        moving = changed(before, after, "stage4_block2_bn2/moving_mean")
        assert all(moving.values())  # a training BatchNorm does update its statistics


def test_backbone_learning_rate_is_scaled_and_held_at_zero_for_head_steps():
    def update(scale, head_steps=0):
        keras.utils.set_random_seed(0)
        model = classifier()
        before = snapshot(model)
        one_step(model, T.scale_backbone_lr(keras.optimizers.SGD(0.1), scale, head_steps))
        after = snapshot(model)
        return {k: after[k] - before[k] for k in before}

    full, half, held = update(1.0), update(0.5), update(0.5, head_steps=5)
    kernel, head = "stage2_block1_conv1/kernel", "predictions/kernel"
    assert np.abs(full[kernel]).max() > 0
    # (float32 weights: the differences carry ~1e-8 of rounding)
    np.testing.assert_allclose(half[kernel], 0.5 * full[kernel], rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(half[head], full[head], rtol=1e-5)
    assert not np.any(held[kernel]) and np.any(held[head])


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    """A tiny keras_resnet run directory to fine-tune from (as a pretraining would):
    resnet10t, the smoke preset's network."""
    tmp = tmp_path_factory.mktemp("pre")
    root = write_folder(tmp / "data", per_class=8, size=32)
    T.train(T.smoke_config(data_dir=str(root), output_dir=str(tmp / "run"),
                           validation_size=4, max_train_images=None))
    return tmp / "run"


@pytest.fixture(scope="module")
def new_task(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("new"), per_class=6, size=32,
                        classes=("ant", "bee"))


def finetune_args(new_task, weights, out, *extra):
    return ["--data-dir", new_task, "--weights", weights, "--output-dir", out,
            "--epochs", "2", "--batch-size", "4", "--verbose", "0", "--crop", "pad", *extra]


def test_finetune_from_a_run_directory_keeps_its_preprocessing(pretrained_run, new_task,
                                                               tmp_path):
    out = tmp_path / "ft"
    r = run_main(cli.finetune_main, *finetune_args(new_task, pretrained_run, out,
                                                   "--mode", "top"))
    assert r.returncode == 0, r.stderr
    for name in ("best.keras", "last.keras", "history.csv", "labels.txt", "test_metrics.json",
                 "config.json", "curves.png", "confusion_matrix.png"):
        assert (out / name).exists(), name
    assert (out / "labels.txt").read_text().split() == ["ant", "bee"]
    source = keras.saving.load_model(pretrained_run / "best.keras", compile=False)
    tuned = keras.saving.load_model(out / "best.keras", compile=False)
    assert tuned.output.shape == (None, 2) and tuned.input.shape == (None, 32, 32, 3)
    # The pretraining's normalisation travels with its weights; the frozen stem too.
    np.testing.assert_allclose(np.ravel(tuned.get_layer("normalize").mean),
                               np.ravel(source.get_layer("normalize").mean), rtol=1e-6)
    np.testing.assert_array_equal(tuned.get_layer("stem_conv1").get_weights()[0],
                                  source.get_layer("stem_conv1").get_weights()[0])
    config = json.loads((out / "config.json").read_text())
    assert config["mode"] == "top" and config["weights"] == str(pretrained_run)
    assert config["model"] == "resnet10t"  # no --model: the run's own network
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["num_images"] == 12 and set(metrics["per_class"]) == {"ant", "bee"}


def test_finetune_imagenet_style_from_a_torch_checkpoint(new_task, tmp_path):
    """A .safetensors checkpoint (torchvision names): ImageNet preprocessing inside."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from keras_resnet import MODELS
    from keras_resnet.torch_reference import build_reference
    from keras_resnet.weights import PREPROCESSING

    torch.manual_seed(0)
    ref = build_reference(MODELS["resnet18"], 1000, "imagenet")
    path = str(tmp_path / "r18.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    out = tmp_path / "ft"
    r = run_main(cli.finetune_main, "--data-dir", new_task, "--weights", path, "--output-dir",
                 out, "--epochs", "1", "--batch-size", "4", "--verbose", "0", "--image-size",
                 "64", "--mode", "linear")
    assert r.returncode == 0, r.stderr
    tuned = keras.saving.load_model(out / "best.keras", compile=False)
    assert tuned.input.shape == (None, 64, 64, 3)
    np.testing.assert_allclose(np.ravel(tuned.get_layer("normalize").mean),
                               PREPROCESSING["imagenet"]["mean"], rtol=1e-6)
    np.testing.assert_allclose(tuned.get_layer("stage1_block1_conv1").get_weights()[0],
                               ref.layer1[0].conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
    # The eval crop (0.875 of the shorter side) is recorded for predict.py and export.
    from keras_resnet.predict import read_crop_ratio

    assert json.loads((out / "preprocessing.json").read_text()) == {"crop_ratio": 0.875}
    assert read_crop_ratio(str(out / "best.keras")) == 0.875
    assert read_crop_ratio(str(tmp_path)) == 1.0


@pytest.mark.parametrize("extra, message", [
    (["--mode", "top", "--unfreeze-stages", "5"],
     "unfreeze_stages: got 5; must be an integer in 1..4"),
    (["--mode", "middle"], "mode: got 'middle'"),
    (["--head-epochs", "2"], r"head_epochs: got 2; must be an integer in \[0, epochs\)"),
    (["--backbone-lr-scale", "0"], r"backbone_lr_scale: got 0.0; must be in \(0, 1\]"),
])
def test_bad_finetune_flags(pretrained_run, new_task, tmp_path, extra, message):
    out = tmp_path / "ft"
    r = run_main(cli.finetune_main, *finetune_args(new_task, pretrained_run, out, *extra))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert re.search(message, r.stderr), r.stderr
    assert not out.exists()


@pytest.mark.parametrize("name, stem", [("resnet18", "imagenet"), ("resnet18d", "deep"),
                                        ("resnet10t", "deep_tiered")])
def test_the_stem_of_a_saved_model_is_read_from_its_layers(name, stem):
    """Fine-tuning from a .keras file rebuilds its backbone with this stem."""
    assert T.infer_stem(kr_build(name, input_shape=(64, 64, 3))) == stem
    assert T.infer_stem(kr_build(name, stem="cifar", input_shape=(32, 32, 3))) == "cifar"


def test_bad_weights_and_folders_are_refused_before_anything_is_written(
        pretrained_run, new_task, tmp_path):
    from PIL import Image

    out = tmp_path / "ft"
    cases = []
    other = tmp_path / "other.keras"  # a Keras model that is not a classifier of ours
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(other)
    cases.append((finetune_args(new_task, other, out), "not a keras_resnet classifier"))
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 64)
    cases.append((finetune_args(new_task, tmp_path / "junk.pth", out),
                  "not a PyTorch checkpoint"))
    cases.append((finetune_args(new_task, tmp_path / "missing.pth", out),
                  "neither 'imagenet', a weights file nor a run directory"))
    cases.append((finetune_args(new_task, pretrained_run, out, "--model", "resnet34"),
                  "has no layer 'stage1_block2_conv1': --model resnet34 is not the network"))
    lonely = tmp_path / "lonely.keras"  # no config.json beside it: resnet18 is assumed
    shutil.copy(pretrained_run / "best.keras", lonely)
    cases.append((finetune_args(new_task, lonely, out),
                  "--model resnet18 is not the network in"))
    single = tmp_path / "single" / "train" / "only"
    os.makedirs(single)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(single / "a.png")
    cases.append((finetune_args(tmp_path / "single", pretrained_run, out),
                  "images of 1 class; a classifier needs at least 2"))
    empty = tmp_path / "empty" / "train"
    for c in ("a", "b"):
        os.makedirs(empty / c)
        (empty / c / "notes.txt").write_text("no image")
    cases.append((finetune_args(tmp_path / "empty", pretrained_run, out), "no image files"))
    for args, message in cases:
        r = run_main(cli.finetune_main, *args)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not out.exists(), message


@pytest.mark.slow
def test_finetune_killed_mid_run_resumes_and_its_run_predicts(pretrained_run, new_task,
                                                              tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from helpers import ROOT

    out = tmp_path / "ft"
    args = [str(a) for a in finetune_args(new_task, pretrained_run, out, "--mode", "full",
                                          "--head-epochs", "1", "--epochs", "4",
                                          "--batch-size", "2")]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "finetune.py"),
                             *args], env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = out / "backup" / "training_metadata.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(meta.read_text()).get("epoch", 0) >= 1:
                break  # past the head-only epoch, inside the next
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "test_metrics.json").exists()
    again = run_main(cli.finetune_main, *args)  # the same command: resumes
    assert again.returncode == 0, again.stderr[-2000:]
    assert T.read_history(str(out / "history.csv"))["epoch"] == [0, 1, 2, 3]
    assert not [f for f in os.listdir(out) if f.endswith(".tmp") or f == ".lock"]
    pred = run_main(cli.predict_main, str(out), os.path.join(new_task, "test", "ant"),
                    "--top-k", "1", "--json")
    assert pred.returncode == 0, pred.stderr[-2000:]
    rows = [json.loads(line) for line in pred.stdout.strip().splitlines()]
    assert len(rows) == 6 and all(r["top_k"][0][0] in ("ant", "bee") for r in rows)
