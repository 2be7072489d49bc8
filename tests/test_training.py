import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from helpers import ROOT, run_main, run_python, run_script, write_folder

from keras_resnet import cli, data, evaluation
from keras_resnet import training as T
from keras_resnet.model import build_classifier

SCRIPT = "train_cifar10.py"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(write_folder(tmp_path_factory.mktemp("data"), per_class=16, size=32))


def run_cli(*args, timeout=300):
    return run_script(SCRIPT, *args, timeout=timeout)


def assert_consistent_scores(metrics, num_images):
    """top1 / per-class figures are exactly what the confusion matrix says."""
    confusion = np.asarray(metrics["confusion_matrix"])
    assert confusion.sum() == metrics["num_images"] == num_images
    assert metrics["top1"] == round(np.trace(confusion) / num_images, 4)
    for i, name in enumerate(sorted(metrics["per_class"])):
        assert metrics["per_class"][name] == round(confusion[i, i] / confusion[i].sum(), 4)


def smoke(folder, out, **kw):
    return T.smoke_config(data_dir=folder, output_dir=str(out), max_train_images=None,
                          validation_size=8, **kw)


def test_smoke_run_writes_the_run_directory(folder, tmp_path, monkeypatch):
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    traces = []
    step = TensorFlowTrainer.train_step
    monkeypatch.setattr(TensorFlowTrainer, "train_step",
                        lambda self, data: traces.append(1) or step(self, data))
    report = T.train(smoke(folder, tmp_path / "run", epochs=2, tta_flip=True, tta_shift=1))
    # The optimiser is built before fit: tf.function traces the train step once, not
    # twice (variables created on a first call make it trace again).
    assert len(traces) == 1
    files = set(os.listdir(tmp_path / "run"))
    assert {"config.json", "best.keras", "last.keras", "history.csv", "curves.png",
            "test_metrics.json", "confusion_matrix.png", "logs"} <= files
    metrics = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert set(metrics) >= {"top1", "top5", "per_class"} and metrics["tta_flip"] is True
    assert metrics["tta_shift"] == 1  # and each view shifted by +/-1 pixel: 6 views
    assert 0 <= metrics["top1_single_view"] <= 1  # the score without the other views
    assert 0 <= metrics["top1_flip_only"] <= 1
    assert sorted(metrics["per_class"]) == ["cat", "dog", "eel"]
    assert metrics["top5"] == 1.0  # 3 classes: the true one is always in the top 5
    assert_consistent_scores(metrics, 16)
    assert report["top1"] == metrics["top1"]
    history = T.read_history(str(tmp_path / "run" / "history.csv"))
    assert history["epoch"] == [0, 1] and all(np.isfinite(history["loss"]))
    assert 0 < history["seconds"][0] < history["seconds"][1]  # training wall clock
    assert (metrics["backend"], metrics["replicas"], metrics["pipeline"]) == (
        "tensorflow", 1, "tfdata")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["epochs"] == 2 and config["data_dir"] == folder
    best = keras.saving.load_model(tmp_path / "run" / "best.keras", compile=False)
    assert best.get_layer("normalize") is not None and best.output.shape == (None, 3)
    # The reported top-1 is the best checkpoint's, recomputed here without flip TTA.
    splits = data.load_splits(data_dir=folder, validation_size=8, max_eval_images=16)
    test_ds = data.make_eval_dataset(splits.test, 8, 3)
    plain = evaluation.evaluate(best, test_ds, splits.class_names)
    assert_consistent_scores(plain, 16)
    probs, labels = evaluation.predict_probabilities(best, test_ds)
    assert plain["top1"] == round(float(np.mean(probs.argmax(1) == labels)), 4)
    assert keras.config.dtype_policy().name == "float32"  # train() restored the policy


def test_evaluate_reads_a_dataset_once_so_reshuffled_labels_stay_paired():
    """evaluate() takes each batch's labels as the batch is predicted: a test set that
    reshuffles on every pass still scores each image against its own label."""
    import tensorflow as tf

    images = np.random.default_rng(0).normal(size=(48, 4, 4, 3)).astype("float32")
    inputs = keras.Input((4, 4, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)  # a mirror leaves it unchanged
    model = keras.Model(inputs, keras.layers.Dense(
        3, kernel_initializer=keras.initializers.RandomNormal(seed=1))(pooled))
    labels = model.predict(images, verbose=0).argmax(1)
    assert len(set(labels)) == 3  # each image's own label is the model's answer
    test_ds = tf.data.Dataset.from_tensor_slices((images, np.eye(3)[labels])).shuffle(
        48, seed=2, reshuffle_each_iteration=True).batch(8)
    for tta_flip in (False, True):
        report = evaluation.evaluate(model, test_ds, list("abc"), tta_flip=tta_flip)
        assert report["top1"] == 1.0
        assert_consistent_scores(report, 48)


def test_ema_checkpoints_hold_the_average_and_the_backup_the_raw_weights(folder, tmp_path):
    """With ``ema``, best.keras and last.keras hold the averaged weights; the backup
    (what a resume loads) holds the raw weights and, in the optimiser, that average."""
    T.train(smoke(folder, tmp_path / "run", epochs=2, ema=0.5, schedule="linear",
                  bias_lr_scale=2.0, alternate_flip=True))
    last = keras.saving.load_model(tmp_path / "run" / "last.keras")
    averaged = [v.numpy() for v in last.trainable_variables]
    last.load_weights(tmp_path / "run" / "backup" / "latest.weights.h5")
    raw = [v.numpy() for v in last.trainable_variables]
    ema = [v.numpy() for v in last.optimizer._model_variables_moving_average]
    for a, e in zip(averaged, ema, strict=True):
        np.testing.assert_array_equal(a, e)
    assert sum(not np.array_equal(a, r) for a, r in zip(averaged, raw, strict=True)) > 20
    assert int(last.optimizer.iterations.numpy()) == 2 * (48 - 8) // 8  # smoke batch 8


@pytest.mark.slow
def test_resume_after_kill_mid_epoch(folder, tmp_path):
    out = tmp_path / "run"
    args = ["--preset", "smoke", "--data-dir", folder, "--output-dir", str(out),
            "--epochs", "4", "--max-train-images", "48", "--validation-size", "8",
            "--batch-size", "4", "--schedule", "onecycle", "--warmup-epochs", "1"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", SCRIPT), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = out / "backup" / "training_metadata.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if meta.exists() and json.loads(meta.read_text()).get("epoch", 0) >= 1:
            time.sleep(0.5)  # now inside epoch 2
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = json.loads(meta.read_text())["epoch"]
    assert 1 <= done_before < 4
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    seconds = [float(r["seconds"]) for r in rows]
    assert seconds == sorted(seconds) and seconds[0] > 0  # the clock continues over the resume
    last = keras.saving.load_model(out / "last.keras")
    steps = 40 // 4
    assert int(last.optimizer.iterations.numpy()) == 4 * steps  # schedule continued
    assert (out / "test_metrics.json").exists()


@pytest.mark.slow
def test_memory_pipeline_on_the_tensorflow_backend(folder, tmp_path):
    report = T.train(smoke(folder, tmp_path / "run", pipeline="memory", epochs=2))
    assert (report["backend"], report["pipeline"]) == ("tensorflow", "memory")
    assert_consistent_scores(report, 16)
    best = keras.saving.load_model(tmp_path / "run" / "best.keras", compile=False)
    assert [la.name for la in best.get_layer("augment").layers] == ["aug_crop", "aug_flip"]


def test_time_to_accuracy_reads_the_seconds_column():
    from keras_resnet.benchmark import time_to_accuracy

    history = {"epoch": [0, 1, 2], "val_accuracy": [0.5, 0.82, 0.9],
               "seconds": [10.0, 20.5, 31.0]}
    assert time_to_accuracy(history, [0.8, 0.85, 0.95]) == {
        0.8: {"epoch": 2, "seconds": 20.5}, 0.85: {"epoch": 3, "seconds": 31.0}, 0.95: None}
    with pytest.raises(ValueError, match="predates the seconds column"):
        time_to_accuracy({"val_accuracy": [0.1]}, [0.5])


@pytest.mark.slow
def test_time_to_accuracy_script(folder, tmp_path):
    out = tmp_path / "run"
    # 24 validation images: after one epoch some are right (with 8, none sometimes were).
    result = run_main(cli.time_to_accuracy_main, "--data-dir", folder, "--preset", "smoke",
                      "--max-train-images", "32", "--validation-size", "24", "--epochs", "2",
                      "--targets", "0.01,1.0", "--output-dir", out)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    hit = report["time_to_accuracy"]["0.01"]
    history = T.read_history(str(out / "history.csv"))
    assert hit == {"epoch": 1, "seconds": round(history["seconds"][0], 1)}
    assert report["device"] == "CPU" and "cores" in report["machine"]
    assert ("val top-1 >= 0.01: " in result.stdout) and report["epochs"] == 2
    for flags, message in ((["--targets", "1.5"], "--targets: got '1.5'"),
                           (["--validation-size", "0"], "--validation-size: the targets")):
        bad = run_main(cli.time_to_accuracy_main, "--data-dir", folder, "--output-dir",
                       tmp_path / "bad", *flags)
        assert bad.returncode == 2 and message in bad.stderr
        assert not (tmp_path / "bad").exists()


def test_resume_with_other_config_is_refused(folder, tmp_path):
    out = tmp_path / "run"
    # An unfinished run: its config.json and a backup/ that BackupAndRestore left.
    T.prepare_run_dir(T.smoke_config(data_dir=folder, output_dir=str(out), validation_size=8))
    (out / "backup").mkdir()
    result = run_main(cli.train_main, "--preset", "smoke", "--data-dir", folder,
                      "--output-dir", str(out), "--validation-size", "8", "--lr", "0.5")
    assert result.returncode == 2
    assert (f"unfinished run with another config (lr: run has {T.TrainConfig().lr}, asked 0.5)"
            in result.stderr)


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "-1"], "epochs: got -1"),
    (["--batch-size", "0"], "batch_size: got 0"),
    (["--optimizer", "lamb"], "optimizer: got 'lamb'"),
    (["--schedule", "exponential"], "schedule: got 'exponential'"),
    (["--ema", "1"], "ema: got 1.0; must be in [0, 1)"),
    (["--bias-lr-scale", "0"], "bias_lr_scale: got 0.0; must be > 0"),
    (["--tta-shift", "5"], "tta_shift: got 5; must be an integer in 0..4"),
    (["--model", "resnet17"], "model: got 'resnet17'"),
    (["--data-dir", "/no/such/dir"], "data_dir: '/no/such/dir' is not a directory"),
    (["--output-dir", "/etc/hostname/run"], "output_dir: cannot write to"),
])
def test_bad_flags_fail_fast(flags, message, tmp_path, monkeypatch):
    def load_data(*args, **kwargs):  # "fast": before any data is read or model built
        raise AssertionError(f"the data were read despite {flags}")

    monkeypatch.setattr(T, "load_data", load_data)
    result = run_main(cli.train_main, "--output-dir", str(tmp_path / "o"), *flags)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_help_lists_defaults(monkeypatch):
    result = run_main(cli.train_main, "--help")
    assert result.returncode == 0
    for flag in ("--model", "--data-dir", "--epochs", "--batch-size", "--output-dir",
                 "--seed", "--max-train-images", "--max-eval-images", "--optimizer",
                 "--schedule", "--precision", "--strategy", "--no-crop-flip"):
        assert flag in result.stdout
    # Each setting's comment in TrainConfig, continuation lines too, beside its default.
    text = " ".join(result.stdout.split())
    assert "--crop-padding CROP_PADDING pad crop: pixels of zero padding (max shift) (default: 2)" \
        in text
    helps = {a.dest: a.help for a in cli._config_parser(T.TrainConfig, "")._actions}
    assert helps["strategy"] == ("default | mirrored | multiworker (TensorFlow) | "
                                 "data-parallel (JAX: keras.distribution) (default: default)")
    assert "--momentum MOMENTUM default: 0.9" in text  # no comment: the default alone
    tuned = run_main(cli.finetune_main, "--help")  # the subclass's comment wins
    assert "None = the network of the weights' run, else resnet18 (default: None)" in " ".join(
        tuned.stdout.split())
    import inspect

    def no_source(obj):
        raise OSError("could not get source code")

    monkeypatch.setattr(inspect, "getsource", no_source)  # a .pyc-only install
    helps = {a.dest: a.help for a in cli._config_parser(T.TrainConfig, "")._actions}
    assert helps["strategy"] == "default: default"


def schedule_at(config, steps_per_epoch, lr, steps):
    s = T.make_schedule(config, steps_per_epoch, lr)
    return [float(s(step)) if callable(s) else s for step in steps]


def test_schedules():
    c = T.TrainConfig(epochs=10, warmup_epochs=1)
    one = schedule_at(c, 100, 0.2, [0, 50, 100, 550, 1000])
    np.testing.assert_allclose(one, [0.2 / 25, (0.2 / 25 + 0.2) / 2, 0.2, 0.1, 0.0], atol=1e-6)
    assert isinstance(T.make_schedule(c, 100, 0.2), keras.optimizers.schedules.CosineDecay)
    cos = schedule_at(T.TrainConfig(epochs=10, warmup_epochs=1, schedule="cosine"), 100,
                      0.1, [0, 50, 100, 1000])
    np.testing.assert_allclose(cos, [0.0, 0.05, 0.1, 0.0], atol=1e-6)
    step = schedule_at(T.TrainConfig(epochs=10, schedule="step"), 100, 0.1, [0, 499, 501, 751])
    np.testing.assert_allclose(step, [0.1, 0.1, 0.01, 0.001], rtol=1e-5)
    assert schedule_at(T.TrainConfig(schedule="constant"), 100, 0.3, [0, 999]) == [0.3, 0.3]
    linear = T.TrainConfig(epochs=10, warmup_epochs=1, schedule="linear")
    np.testing.assert_allclose(schedule_at(linear, 100, 0.2, [0, 50, 100, 550, 1000, 1100]),
                               [0.2 / 25, (0.2 / 25 + 0.2) / 2, 0.2, 0.1, 0.0, 0.0], atol=1e-6)
    saved = keras.saving.serialize_keras_object(T.make_schedule(linear, 100, 0.2))
    assert saved["registered_name"] == "keras_resnet>Triangular"
    assert float(keras.saving.deserialize_keras_object(saved)(550)) == pytest.approx(0.1)
    no_warmup = T.TrainConfig(epochs=10, warmup_epochs=0, schedule="linear")
    np.testing.assert_allclose(schedule_at(no_warmup, 100, 0.2, [0, 500]), [0.2, 0.1], atol=1e-6)


def test_runs_of_version_0_1_load_their_one_cycle_schedule():
    saved = {"module": None, "class_name": "OneCycle", "registered_name": "keras_resnet>OneCycle",
             "config": {"peak": 0.2, "total_steps": 1000, "warmup_steps": 100}}
    schedule = keras.saving.deserialize_keras_object(saved)
    np.testing.assert_allclose([float(schedule(s)) for s in (0, 100, 550, 1000)],
                               [0.2 / 25, 0.2, 0.1, 0.0], atol=1e-6)
    assert keras.saving.serialize_keras_object(schedule)["config"] == saved["config"]


def cifar_classifier():
    return build_classifier("resnet18", image_size=(32, 32), num_classes=10, mean=(0, 0, 0),
                            std=(1, 1, 1), stem="cifar")


def test_weight_decay_skips_bn_and_bias():
    model = cifar_classifier()
    T.make_optimizer(T.TrainConfig(optimizer="nesterov", weight_decay=1e-3), 0.1, model)
    decayed = {v.path for v in model.trainable_weights if v.regularizer is not None}
    assert "stem_conv1/kernel" in decayed and "predictions/kernel" in decayed
    assert not any(p.endswith(("gamma", "beta", "bias")) for p in decayed)
    assert len(decayed) == 21  # 20 convs + the classifier kernel
    model2 = cifar_classifier()
    opt = T.make_optimizer(T.TrainConfig(optimizer="adamw", weight_decay=0.05), 0.1, model2)
    assert opt.weight_decay == 0.05
    assert not any(v.regularizer for v in model2.trainable_weights)
    # One step with zero gradients: Adam moves nothing, so only decoupled decay
    # acts: the kernel shrinks by lr * wd, the BN gamma stays.
    gamma, kernel = model2.get_layer("stem_bn1").gamma, model2.get_layer("stem_conv1").kernel
    before = kernel.numpy()
    opt.apply_gradients([(np.zeros(v.shape, "float32"), v) for v in (gamma, kernel)])
    np.testing.assert_array_equal(gamma.numpy(), 1.0)
    np.testing.assert_allclose(kernel.numpy(), before * (1 - 0.1 * 0.05), rtol=1e-6)


def test_bias_lr_scale_and_ema():
    """``bias_lr_scale`` multiplies the step of BN betas and biases only; ``ema`` keeps
    Keras's moving average of every trainable weight in the optimiser."""
    model = cifar_classifier()
    config = T.TrainConfig(optimizer="sgd", momentum=0.0, weight_decay=0.0, bias_lr_scale=4.0,
                           ema=0.9)
    opt = T.make_optimizer(config, 0.1, model)
    assert opt.use_ema and opt.ema_momentum == 0.9
    layers = [model.get_layer("stem_bn1").beta, model.get_layer("stem_bn1").gamma,
              model.get_layer("predictions").bias, model.get_layer("predictions").kernel]
    before = [v.numpy() for v in layers]
    opt.apply_gradients([(np.ones(v.shape, "float32"), v) for v in layers])
    steps = [float(np.mean(b - v.numpy())) for b, v in zip(before, layers)]
    np.testing.assert_allclose(steps, [0.4, 0.1, 0.4, 0.1], rtol=1e-5)


def test_muon_orthogonalises_conv_kernels_and_leaves_the_rest_to_adamw():
    model = cifar_classifier()
    opt = T.make_optimizer(T.TrainConfig(optimizer="muon", weight_decay=0.0), 1e-3, model)
    opt.build(model.trainable_variables)
    conv = model.get_layer("stage1_block1_conv1").kernel
    head, gamma = model.get_layer("predictions").kernel, model.get_layer("stem_bn1").gamma
    assert [opt._should_use_adamw(v) for v in (conv, head, gamma)] == [False, True, True]
    before = conv.numpy()
    opt.apply_gradients([(np.random.default_rng(0).normal(size=conv.shape).astype("float32"),
                          conv)])
    # Keras's Muon would take an AdamW step here: every element moves by ~lr. Newton-Schulz
    # instead makes the flattened (576, 64) update close to orthogonal: its singular
    # values lie within a factor of 2 of each other.
    singular = np.linalg.svd((before - conv.numpy()).reshape(-1, 64), compute_uv=False)
    assert singular.max() / singular.min() < 2 and singular.min() > 0
    # A run's .keras files hold the optimiser: it must load back (resume, export).
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(opt))
    assert isinstance(again, T.ConvMuon) and again.exclude_layers == ["predictions"]
    assert opt.newton_schulz_dtype == again.newton_schulz_dtype == "float32"


def test_muon_iterates_in_bfloat16_under_the_mixed_bfloat16_policy():
    """Newton-Schulz in bfloat16 (as Muon's reference) still yields a near-orthogonal
    update, close to the float32 one, applied to the float32 variable."""
    x = np.random.default_rng(1).normal(size=(3, 3, 32, 64)).astype("float32")
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        opt = T.ConvMuon(1e-3, newton_schulz_dtype=dtype)
        out = opt.zeropower_via_newtonschulz5(keras.ops.convert_to_tensor(x), 5)
        assert keras.backend.standardize_dtype(out.dtype) == "float32"
        outputs[dtype] = keras.ops.convert_to_numpy(out).reshape(-1, 64)
        singular = np.linalg.svd(outputs[dtype], compute_uv=False)
        assert singular.max() / singular.min() < 2 and singular.min() > 0
    low, high = outputs["bfloat16"], outputs["float32"]
    relative = np.linalg.norm(low - high) / np.linalg.norm(high)
    assert 0 < relative < 0.1, relative  # bfloat16 keeps ~3 significant digits
    keras.config.set_dtype_policy("mixed_bfloat16")  # conftest restores float32
    opt = T.make_optimizer(T.TrainConfig(optimizer="muon"), 1e-3, cifar_classifier())
    assert opt.newton_schulz_dtype == "bfloat16"


def test_precision_choice(tmp_path, monkeypatch):
    with_bf16, without = tmp_path / "bf16", tmp_path / "plain"
    with_bf16.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n")
    without.write_text("flags\t\t: fpu sse2 avx2 avx512f\n")
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    assert T.cpu_has_bfloat16(str(with_bf16)) and not T.cpu_has_bfloat16(str(without))
    assert not T.cpu_has_bfloat16(str(tmp_path / "missing"))
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert not T.cpu_has_bfloat16(str(with_bf16))
    assert T.resolve_precision("float32") == "float32"
    assert T.resolve_precision("bfloat16") == "mixed_bfloat16"
    assert T.resolve_precision("float16") == "mixed_float16"
    monkeypatch.setattr(T, "cpu_has_bfloat16", lambda: True)
    assert T.resolve_precision("auto") == "mixed_bfloat16"  # no GPU on the test machines
    monkeypatch.setattr(T, "cpu_has_bfloat16", lambda: False)
    assert T.resolve_precision("auto") == "float32"


@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop", "adam", "adamw", "muon"])
def test_every_optimizer_takes_a_finite_step(optimizer):
    config = T.TrainConfig(optimizer=optimizer, clipnorm=1.0, weight_decay=5e-4)
    # A conv-BN-dense network: the optimiser and its decay rules, without ResNet's trace time.
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
    model = keras.Model(inputs, keras.layers.Dense(3, name="predictions")(x))
    model.compile(optimizer=T.make_optimizer(config, 0.01, model),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).uniform(0, 1, (4, 8, 8, 3)).astype("float32")
    y = np.eye(3, dtype="float32")[[0, 1, 2, 0]]
    before = model.get_layer("conv").kernel.numpy()
    loss = model.train_on_batch(x, y)
    assert np.isfinite(loss)
    assert not np.array_equal(model.get_layer("conv").kernel.numpy(), before)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_bfloat16_and_in_model_augmentation_train(folder, tmp_path, optimizer):
    precision = "bfloat16" if optimizer == "sgd" else "float32"
    in_model = optimizer == "adam"  # augmentation inside the model, on the accelerator
    report = T.train(smoke(folder, tmp_path / optimizer, optimizer=optimizer,
                           precision=precision, clipnorm=1.0, mixup=0.2, label_smoothing=0.1,
                           augment_in_model=in_model))
    history = T.read_history(str(tmp_path / optimizer / "history.csv"))
    assert np.isfinite(history["loss"][0])
    assert_consistent_scores(report, 16)
    best = keras.saving.load_model(tmp_path / optimizer / "best.keras", compile=False)
    assert ("augment" in [la.name for la in best.layers]) == in_model
    expected = "bfloat16" if precision == "bfloat16" else "float32"
    assert best.get_layer("stem_conv1").compute_dtype == expected
    assert keras.config.dtype_policy().name == "float32"


MULTI_DEVICE = """
import sys, json, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from keras_resnet import training as T
config = T.smoke_config(data_dir=sys.argv[1], output_dir=sys.argv[2], max_train_images=None,
                        validation_size=8, strategy="mirrored", batch_size=4)
report = T.train(config)
import tensorflow as tf
print("RESULT", json.dumps({"replicas": tf.distribute.MirroredStrategy().num_replicas_in_sync,
                            "top1": report["top1"]}))
"""


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus(folder, tmp_path):
    result = run_python(MULTI_DEVICE, folder, str(tmp_path / "r"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lr = T.TrainConfig().lr * 8 / T.LR_REFERENCE_BATCH  # linear scaling to the global batch
    assert f"2 replica(s), global batch 8, peak lr {lr:g}" in result.stdout
    assert '"replicas": 2' in result.stdout
    assert T.read_history(str(tmp_path / "r" / "history.csv"))["epoch"] == [0]


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MULTI_WORKER = """
import sys
from keras_resnet import training as T
config = T.smoke_config(data_dir=sys.argv[1], output_dir=sys.argv[2], max_train_images=None,
                        validation_size=8, strategy="multiworker", batch_size=4)
T.train(config)
"""


@pytest.mark.slow
def test_multi_worker_two_local_processes(folder, tmp_path):
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_CONFIG": tf_config}
        procs.append(subprocess.Popen(
            [sys.executable, "-c", MULTI_WORKER, folder, str(tmp_path / f"w{index}")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=400) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "2 replica(s), global batch 8" in out
    h0, h1 = (T.read_history(str(tmp_path / w / "history.csv")) for w in ("w0", "w1"))
    h0.pop("seconds"), h1.pop("seconds")  # each worker's own wall clock
    assert h0["epoch"] == [0] and h0 == h1  # both workers see the all-reduced metrics


def resolve(*argv, config=None, tmp_path=None):
    if config is not None:
        path = tmp_path / "config.json"
        path.write_text(json.dumps(config))
        argv = (*argv, "--config", str(path))
    return cli.resolve_train_config(list(argv))


def test_flag_precedence_preset_config_file_typed_flags(tmp_path):
    recipe, baseline = T.TrainConfig(), T.baseline_config()
    assert resolve() == recipe
    assert resolve("--preset", "baseline") == baseline
    # A typed flag wins even when its value is the recipe's default.
    assert recipe.optimizer == "muon" and baseline.optimizer == "sgd"
    assert resolve("--preset", "baseline", "--optimizer", "nesterov").optimizer == "nesterov"
    assert resolve("--preset", "baseline", "--lr", "0.2").lr == 0.2
    assert resolve("--preset", "baseline", "--zero-init-residual").zero_init_residual is True
    assert resolve("--no-zero-init-residual").zero_init_residual is False
    # The config file overrides the preset; typed flags override the file.
    c = resolve("--preset", "baseline", config={"optimizer": "adam", "epochs": 7},
                tmp_path=tmp_path)
    assert (c.optimizer, c.epochs, c.schedule) == ("adam", 7, baseline.schedule)
    c = resolve("--preset", "baseline", "--optimizer", "sgd", "--epochs", "30",
                config={"optimizer": "adam", "epochs": 7}, tmp_path=tmp_path)
    assert (c.optimizer, c.epochs) == ("sgd", 30)
    assert resolve("--preset", "smoke", "--epochs", "2") == T.smoke_config(epochs=2)


def test_config_file_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="unknown key.*'optimiser'"):
        resolve(config={"optimiser": "adam"}, tmp_path=tmp_path)
    with pytest.raises(ValueError, match="must hold a JSON object"):
        resolve(config=[1, 2], tmp_path=tmp_path)
    result = run_main(cli.train_main, "--config", str(tmp_path / "missing.json"))
    assert result.returncode == 2 and "--config: cannot read" in result.stderr
    (tmp_path / "bad.json").write_text(json.dumps({"epochs": 3, "lr_peak": 1}))
    result = run_main(cli.train_main, "--config", str(tmp_path / "bad.json"))
    assert result.returncode == 2 and "unknown key(s) 'lr_peak'" in result.stderr
    for content in ("null", "[]"):
        (tmp_path / "c.json").write_text(content)
        result = run_main(cli.train_main, "--config", str(tmp_path / "c.json"))
        assert result.returncode == 2 and "must hold a JSON object" in result.stderr
    for values, message in [({"step_milestones": 0.5},
                             "'step_milestones' in .* is a number 0.5; must be str"),
                            ({"epochs": "3"}, "'epochs' in .* is a string '3'; must be int"),
                            ({"zero_init_residual": 1}, "is a number 1; must be bool"),
                            ({"max_train_images": [5]}, "is a list .*; must be int or null")]:
        (tmp_path / "c.json").write_text(json.dumps(values))
        result = run_main(cli.train_main, "--config", str(tmp_path / "c.json"))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert re.search(message, result.stderr), result.stderr
    # JSON numbers are fine where a float is wanted.
    assert resolve(config={"lr": 1}, tmp_path=tmp_path).lr == 1


def test_files_that_do_not_decode_are_skipped_and_counted(tmp_path):
    """A JPEG cut after its header passes the scan; the pipeline drops and counts it."""
    from PIL import Image

    root = write_folder(tmp_path / "data", per_class=8, size=32)
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)).save(
        tmp_path / "whole.jpg")
    whole = (tmp_path / "whole.jpg").read_bytes()
    for split, c in (("train", "cat"), ("train", "dog"), ("test", "eel")):
        (root / split / c / "cut.jpg").write_bytes(whole[:len(whole) * 2 // 3])
    report = T.train(T.smoke_config(data_dir=str(root), output_dir=str(tmp_path / "run"),
                                    validation_size=0, max_train_images=None,
                                    max_eval_images=None, batch_size=4, epochs=2))
    assert report["skipped_in_pipeline"] == {"train": 2, "test": 1}
    assert report["num_images"] == 24
    metrics = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert metrics["skipped_in_pipeline"] == {"train": 2, "test": 1}


@pytest.fixture(scope="module")
def finished(folder, tmp_path_factory):
    """One finished 2-epoch run; each test below damages a copy of it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    T.train(smoke(folder, out, epochs=2))
    return out


def finished_run(folder, finished, out):
    import shutil

    shutil.copytree(finished, out)
    return smoke(folder, out, epochs=2)


@pytest.mark.parametrize("damage", ["truncate", "scribble"])
def test_a_damaged_backup_resumes_from_the_one_before(folder, finished, tmp_path, damage):
    config = finished_run(folder, finished, tmp_path / "run")
    latest = tmp_path / "run" / "backup" / "latest.weights.h5"
    data = latest.read_bytes()
    if damage == "truncate":
        latest.write_bytes(data[:len(data) // 3])
    else:  # an object header overwritten in the middle of the file
        middle = len(data) // 2
        latest.write_bytes(data[:middle] + b"\xff" * 4096 + data[middle + 4096:])
    report = T.train(config)
    assert report["epochs"] == 2  # epoch 1 trained again, history not duplicated
    assert T.read_history(str(tmp_path / "run" / "history.csv"))["epoch"] == [0, 1]


def rewrite_history(path, edit):
    """Replace history.csv's rows with ``edit(rows)``: the history a crash left, staged."""
    with open(path) as f:
        rows = edit(list(csv.DictReader(f)))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_a_resumed_run_keeps_the_best_checkpoint_from_before_the_crash(folder, finished,
                                                                     tmp_path):
    """Epoch 0 (made perfect in history.csv) stays best.keras when epoch 1 trains again."""
    config = finished_run(folder, finished, tmp_path / "run")
    latest = tmp_path / "run" / "backup" / "latest.weights.h5"
    latest.write_bytes(latest.read_bytes()[:1000])  # resumes after epoch 0
    history = tmp_path / "run" / "history.csv"
    rewrite_history(history, lambda rows: [{**rows[0], "val_accuracy": "1.0"}, *rows[1:]])
    best = tmp_path / "run" / "best.keras"
    before = best.stat().st_mtime_ns
    report = T.train(config)
    assert T.read_history(str(history))["epoch"] == [0, 1]  # epoch 1 did train again
    assert report["best_val_accuracy"] == 1.0
    assert best.stat().st_mtime_ns == before
    assert (tmp_path / "run" / "last.keras").stat().st_mtime_ns > before


def test_early_stopping_goes_on_from_the_epochs_before_a_resume(folder, tmp_path, capsys):
    """Keras's EarlyStopping counts afresh at each fit; a resumed run counts on."""
    assert T.early_stopping_state([0.5, 0.7, 0.6, 0.6], 2) == (0.7, 2, True)
    assert T.early_stopping_state([0.5, 0.7, 0.6, 0.8], 2) == (0.8, 0, False)
    assert T.early_stopping_state([0.5, float("nan")], 1) == (0.5, 1, True)
    config = smoke(folder, tmp_path / "run", epochs=3, early_stopping=1)
    T.train(config)
    # As a crash after epoch 2 leaves it, with epoch 1 the best and epoch 2 no better:
    # patience 1 is spent, so the resume must not train epoch 3.
    run = tmp_path / "run"
    meta = run / "backup" / "training_metadata.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "epoch": 2}))
    history = run / "history.csv"
    rewrite_history(history, lambda rows: [{**rows[0], "val_accuracy": "0.75"},
                                           {**rows[1], "val_accuracy": "0.5"}])
    capsys.readouterr()
    report = T.train(config)
    assert "early stopping: the run stopped after epoch 2" in capsys.readouterr().out
    assert T.read_history(str(history))["epoch"] == [0, 1]
    assert report["epochs"] == 2 and report["num_images"] == 16


def test_a_checkpoint_save_cut_off_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    """A full disk (or a kill) mid-save: Keras writes a .keras zip in place; ours is
    written beside it and renamed, so best.keras stays the last whole save."""
    import errno

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    path = tmp_path / "best.keras"
    checkpoint = T.AtomicCheckpoint(str(path))
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"loss": 1.0})
    saved = [w.numpy() for w in model.weights]
    model.weights[0].assign(model.weights[0] + 1.0)

    def cut_off(self, filepath, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"PK\x03\x04 the first bytes of a zip")
        raise OSError(errno.ENOSPC, "No space left on device", filepath)

    monkeypatch.setattr(keras.Sequential, "save", cut_off)
    with pytest.raises(OSError, match="No space left on device"):
        checkpoint.on_epoch_end(1, {"loss": 1.0})
    assert os.listdir(tmp_path) == ["best.keras"]  # no temporary file left behind
    loaded = keras.saving.load_model(path, compile=False)
    for a, b in zip(loaded.weights, saved, strict=True):
        np.testing.assert_array_equal(a.numpy(), b)


def test_with_no_validation_split_best_keras_is_the_last_epoch(folder, tmp_path):
    out = tmp_path / "run"
    T.train(T.smoke_config(data_dir=folder, output_dir=str(out), max_train_images=None,
                           validation_size=0, epochs=3))
    best = keras.saving.load_model(out / "best.keras", compile=False)
    last = keras.saving.load_model(out / "last.keras", compile=False)
    for a, b in zip(best.weights, last.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_with_no_validation_split_a_nan_epoch_is_not_kept(folder, tmp_path):
    """Training accuracy of NaN logits is still a number; the loss is what tells."""
    with pytest.raises(ValueError, match="NaN in epoch 0 before any checkpoint was saved"):
        T.train(T.smoke_config(data_dir=folder, output_dir=str(tmp_path / "run"),
                               max_train_images=None, validation_size=0, epochs=2, lr=1e12,
                               optimizer="sgd", schedule="constant", clipnorm=0.0))


def test_a_first_backup_cut_off_mid_write_starts_the_run_over(folder, finished, tmp_path,
                                                              capsys):
    config = finished_run(folder, finished, tmp_path / "run")
    backup = tmp_path / "run" / "backup"
    for name in os.listdir(backup):  # as a kill during the first epoch's save leaves it
        if name.endswith((".bkp", ".json")):
            os.remove(backup / name)
    latest = backup / "latest.weights.h5"
    latest.write_bytes(latest.read_bytes()[:1000])
    report = T.train(config)
    assert "the first backup" in capsys.readouterr().out
    assert report["epochs"] == 2
    assert T.read_history(str(tmp_path / "run" / "history.csv"))["epoch"] == [0, 1]


def test_no_whole_backup_left_says_how_to_start_over(folder, finished, tmp_path):
    config = finished_run(folder, finished, tmp_path / "run")
    backup = tmp_path / "run" / "backup"
    for name in ("latest.weights.h5", "latest.weights.h5.bkp"):
        (backup / name).write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=f"backup in '{backup}' is damaged and no earlier "
                                         f"copy is whole; .*rm -r {backup}"):
        T.train(config)


def test_a_missing_best_checkpoint_does_not_block_the_resume(folder, finished, tmp_path):
    """Nor does the temporary file of a save that a kill cut off: the resume deletes it
    (and nothing else)."""
    config = finished_run(folder, finished, tmp_path / "run")
    os.remove(tmp_path / "run" / "best.keras")
    cut_off = tmp_path / "run" / "best.keras.4242-0123abcd.tmp.keras"
    cut_off.write_bytes(b"PK\x03\x04")
    (tmp_path / "run" / "notes.tmp").write_text("the user's")
    report = T.train(config)
    assert report["scored"] == "last.keras (best.keras is missing)"
    assert report["num_images"] == 16
    assert not cut_off.exists() and (tmp_path / "run" / "notes.tmp").exists()
    # No epoch was left to train, so no training or validation image was counted.
    assert report["skipped_in_pipeline"] == {"test": 0}


def test_nan_loss_is_reported_as_such(folder, tmp_path):
    report = T.train(smoke(folder, tmp_path / "run", epochs=2, lr=1e12, optimizer="sgd",
                           schedule="constant", clipnorm=0.0))
    assert report["stopped"].startswith("NaN loss in epoch 0")
    metrics = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert metrics["stopped"] == report["stopped"]


def test_one_writer_per_run_directory(folder, tmp_path):
    import socket

    from keras_resnet import locking

    out = tmp_path / "run"
    out.mkdir()
    lock = out / locking.LOCK_NAME
    host = socket.gethostname()
    # A live process holds it (this one stands in for a second training).
    lock.write_text(json.dumps({"pid": os.getpid(), "host": host, "since": "now"}))
    r = run_main(cli.train_main, "--preset", "smoke", "--data-dir", folder, "--output-dir",
                 out, "--validation-size", "8")
    assert r.returncode == 2
    assert f"is in use by process {os.getpid()} on {host}" in r.stderr
    assert sorted(os.listdir(out)) == [locking.LOCK_NAME]  # nothing else written
    # Another host's lock cannot be checked: refused, with what to remove.
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "then"}))
    with pytest.raises(locking.LockedError, match=f"on host elsewhere; .*remove {lock}"):
        T.train(smoke(folder, out))
    # A lock left by a killed process is taken over; the run releases it at the end.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": host, "since": "then"}))
    T.train(smoke(folder, out))
    assert not lock.exists() and (out / "test_metrics.json").exists()


def test_two_exports_into_one_folder(tmp_path):
    from keras_resnet import export, locking

    source = tmp_path / "m.keras"
    build_classifier("resnet18", image_size=(8, 8), num_classes=2, mean=(0, 0, 0),
                     std=(1, 1, 1), stem="cifar").save(source)
    out = tmp_path / "exp"
    with locking.hold(str(out)), pytest.raises(locking.LockedError,
                                               match="is in use by process"):
        export.export(str(source), str(out))
    assert os.listdir(out) == []  # the holder released its lock; nothing was written


def test_a_full_disk_names_the_path_and_keeps_the_last_checkpoint(folder, tmp_path,
                                                                  monkeypatch):
    import errno

    out = tmp_path / "run"
    args = ["--preset", "smoke", "--data-dir", folder, "--output-dir", out,
            "--validation-size", "8", "--epochs", "3"]
    real_save = keras.callbacks.BackupAndRestore._save_model
    calls = []

    def save_then_fill_the_disk(self):
        calls.append(1)
        if len(calls) == 2:  # the second epoch's backup: the disk is full
            path = os.path.join(self.backup_dir, "latest.weights.h5")
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real_save(self)

    monkeypatch.setattr(keras.callbacks.BackupAndRestore, "_save_model",
                        save_then_fill_the_disk)
    r = run_main(cli.train_main, *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "No space left on device" in r.stderr and "latest.weights.h5" in r.stderr
    assert "run the same command again" in r.stderr
    assert T._backup_epoch(str(out / "backup")) == 1  # epoch 1's backup survived
    monkeypatch.setattr(keras.callbacks.BackupAndRestore, "_save_model", real_save)
    r = run_main(cli.train_main, *args)  # space freed: the same command resumes
    assert r.returncode == 0, r.stderr
    assert T.read_history(str(out / "history.csv"))["epoch"] == [0, 1, 2]


def test_an_edited_config_json_is_refused_by_field_or_as_unreadable(folder, finished,
                                                                    tmp_path):
    config = finished_run(folder, finished, tmp_path / "run")
    path = tmp_path / "run" / "config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "lr": 0.7}))  # edited by hand
    with pytest.raises(ValueError, match="another config \\(lr: run has 0.7, asked "
                                         f"{T.TrainConfig().lr}\\)"):
        T.train(config)
    path.write_text('{"lr": 0.2,')  # cut short
    with pytest.raises(ValueError, match="config.json' is not a readable config"):
        T.train(config)


def test_whitened_stem_stays_frozen_through_training(folder, tmp_path):
    """--whiten-stem: the stem conv's +/- whitening pairs are still exact after training
    (frozen), and the run's model saves and loads as usual."""
    T.train(smoke(folder, tmp_path / "run", epochs=1, whiten_stem=True))
    model = keras.saving.load_model(tmp_path / "run" / "best.keras", compile=False)
    kernel = model.get_layer("stem_conv1").kernel.numpy()
    np.testing.assert_array_equal(kernel[..., 27:54], -kernel[..., :27])
    assert np.abs(kernel[..., :27]).max() > 0


@pytest.mark.parametrize("flags, match", [
    (["--backend", "tensorflow", "--keras-env", "NO_VALUE"], "--keras-env: got 'NO_VALUE'"),
    (["--keras-env", "TF_ENABLE_ONEDNN_OPTS=0"], "--keras-env: needs --backend"),
])
def test_training_benchmark_refuses_a_bad_keras_env(flags, match):
    """Refused by the argument parser, before any worker starts."""
    result = run_script("benchmark_training.py", *flags, timeout=120)
    assert result.returncode == 2 and match in result.stderr
