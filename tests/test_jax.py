"""Keras's JAX backend: training, prediction and distribution with TensorFlow not
importable, as on the GPU machines (JAX and PyTorch, no TensorFlow).

The subprocess tests run a fresh Python with ``KERAS_BACKEND=jax`` and a
``sitecustomize`` that makes ``import tensorflow`` (and scikit-learn) fail; the in-process tests
check the flags and the memory pipeline on the TensorFlow backend the suite runs on.
"""

import json
import os
import socket

import keras
import numpy as np
import pytest
from helpers import ROOT, run_main, start_python, write_folder

from keras_resnet import arrays, cli, evaluation, training
from keras_resnet import data as D
from keras_resnet.augment import RandomPadCrop, build_augmenter

pytest.importorskip("jax")

BLOCK_TENSORFLOW = '''
import importlib.util
import sys

# scikit-learn too: Keras imports it at start-up when it is there (for its scikit-learn
# wrappers; here only keras-tuner's Bayesian oracle needs it), 0.6-0.9 s a process.
BLOCKED = ("tensorflow", "tensorflow_datasets", "sklearn")


class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)


def find_spec(name, package=None, _find_spec=importlib.util.find_spec):
    """As for a module that is not installed: None, not an error (etils asks this)."""
    return None if name.split(".")[0] in BLOCKED else _find_spec(name, package)


sys.meta_path.insert(0, NoTensorFlow())
importlib.util.find_spec = find_spec
'''

# resnet10t (one basic block a stage): what these runs test is the same for every depth,
# and it compiles in three quarters of ResNet-18's time (test_model builds ResNet-18 under
# JAX).
TINY = ("--preset", "smoke", "--model", "resnet10t", "--validation-size", "8",
        "--max-train-images", "4", "--max-eval-images", "8", "--batch-size", "4",
        "--epochs", "1")


@pytest.fixture
def jax_env(tmp_path):
    block = tmp_path / "no_tensorflow"
    block.mkdir()
    (block / "sitecustomize.py").write_text(BLOCK_TENSORFLOW)
    return {"KERAS_BACKEND": "jax", "PYTHONPATH": f"{block}{os.pathsep}{ROOT}",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


@pytest.fixture
def folder(tmp_path):
    return write_folder(tmp_path / "images", per_class=10, size=16)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_commands(env, calls):
    """A fresh Python (``env``: JAX, no TensorFlow) that runs entry points of
    ``keras_resnet.cli`` one after the other and prints what the test checks."""
    code = "\n".join([
        "import json, sys", "from helpers import run_main", "from keras_resnet import cli",
        "runs = []",
        *[f"runs.append(run_main(cli.{main}, *{[str(a) for a in args]!r}))"
          for main, args in calls],
        "import jax",
        ("print(json.dumps({'codes': [r.returncode for r in runs], "
        "'errors': [r.stderr[-800:] for r in runs], 'stdout': [r.stdout for r in runs], "
        "'devices': jax.device_count(), 'tensorflow': 'tensorflow' in sys.modules}))")])
    return start_python(code, env={**env, "PYTHONPATH": f"{env['PYTHONPATH']}{os.pathsep}"
                                                      f"{os.path.join(ROOT, 'tests')}"})


def _facts(process):
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_train_data_parallel_and_predict_without_tensorflow(jax_env, folder, tmp_path):
    """One device and DataParallel over two (virtual) devices train alike at the same
    global batch; fine-tuning and predict.py run; nothing imports TensorFlow; the
    TensorFlow backend exports the model DataParallel trained and verifies it."""
    one, two, tuned = tmp_path / "one", tmp_path / "two", tmp_path / "tuned"
    train = ["--data-dir", folder, *TINY]
    # Two processes side by side: each keeps about one core busy (mostly compiling).
    first = _start_commands(jax_env, [
        ("train_main", [*train, "--output-dir", one]),
        ("finetune_main", ["--data-dir", folder, "--weights", one, "--output-dir", tuned,
                           "--mode", "linear",  # the smallest training step to compile
                           "--epochs", "1", "--crop", "pad", "--batch-size", "4",
                           "--validation-size", "8", "--max-train-images", "4",
                           "--max-eval-images", "8"])])
    second = _start_commands(jax_env, [
        ("train_main", [*train, "--output-dir", two, "--strategy", "data-parallel",
                        "--batch-size", "2"]),
        ("predict_main", [two, folder / "test" / "cat", "--json"])])
    facts_two = _facts(second)
    # While the first process fine-tunes: export what the second one trained.
    export_dir = tmp_path / "export"
    exported = run_main(cli.export_main, two, "--output-dir", export_dir, "--formats",
                        "saved_model", "--data-dir", folder, "--check-images", "8")
    on_tensorflow = run_main(cli.predict_main, two, folder / "test" / "cat", "--json")
    facts = _facts(first)
    assert facts["codes"] == facts_two["codes"] == [0, 0], (
        facts["errors"] + facts_two["errors"])
    assert facts["devices"] == facts_two["devices"] == 2
    assert not facts["tensorflow"] and not facts_two["tensorflow"]
    assert facts_two["stdout"][1].count("top_k") == 10  # every image of test/cat
    # predict.py under JAX (predict_on_batch) answers as under TensorFlow (an eager call),
    # compared on the PNGs, which both decoders read alike (PIL's and TensorFlow's JPEG
    # decoders may differ).
    assert on_tensorflow.returncode == 0, on_tensorflow.stderr[-2000:]
    answers = [{row["path"]: dict(row["top_k"]) for row in map(json.loads, out.splitlines())
                if row["path"].endswith(".png")}
               for out in (facts_two["stdout"][1], on_tensorflow.stdout)]
    assert len(answers[0]) == 5 and answers[0].keys() == answers[1].keys()
    for path, probs in answers[0].items():
        assert probs.keys() == answers[1][path].keys()
        assert probs == pytest.approx(answers[1][path], abs=1e-4), path
    metrics = [json.loads((run / "test_metrics.json").read_text())
               for run in (one, two, tuned)]
    assert [(m["backend"], m["replicas"], m["pipeline"]) for m in metrics] == [
        ("jax", 1, "memory"), ("jax", 2, "memory"), ("jax", 1, "memory")]
    losses = [training.read_history(str(run / "history.csv"))["loss"] for run in (one, two)]
    # Same data, seed and global batch: the two runs differ only by float reduction order.
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
    assert not (one / "logs").exists()  # TensorBoard writes through TensorFlow: skipped

    assert exported.returncode == 0, exported.stderr[-2000:]
    report = json.loads((export_dir / "export_report.json").read_text())
    assert report["artifacts"]["saved_model"]["passed"], report


@pytest.mark.slow
def test_two_processes_on_localhost(jax_env, folder, tmp_path):
    """jax.distributed over 127.0.0.1 (gloo): both processes finish, only process 0
    writes the run."""
    import subprocess
    import sys

    out, port = tmp_path / "run", _free_port()
    env = {**os.environ, **jax_env, "XLA_FLAGS": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    script = os.path.join(ROOT, "scripts", "train_cifar10.py")
    procs = [subprocess.Popen(
        [sys.executable, script, "--data-dir", str(folder), *TINY, "--batch-size", "2",
         "--optimizer", "sgd", "--output-dir", str(out), "--strategy", "data-parallel",
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id",
         str(i), "--coordinator-timeout", "120"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outputs = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outputs]
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert (metrics["processes"], metrics["replicas"]) == (2, 2)
    assert json.loads(outputs[1][0].strip().splitlines()[-1]) == {"process_id": 1}
    assert "process_id\": 1" not in (out / "config.json").read_text()  # process 0's


def test_a_coordinator_that_never_answers_stops_with_a_message(monkeypatch):
    """Process 1 waits for process 0's port up to --coordinator-timeout, then stops
    with a message (JAX itself would abort the process); a port that answers is joined
    at once. The clock is a fake one that the waits advance: no wall-clock bound."""
    from types import SimpleNamespace

    clock = SimpleNamespace(now=0.0, sleeps=[])

    def sleep(seconds):
        clock.sleeps.append(seconds)
        clock.now += seconds

    monkeypatch.setattr(training, "time", SimpleNamespace(monotonic=lambda: clock.now,
                                                          sleep=sleep))
    config = SimpleNamespace(coordinator=f"127.0.0.1:{_free_port()}", num_processes=2,
                             process_id=1, coordinator_timeout=1.0)
    with pytest.raises(ValueError, match="coordinator: process 1 of 2 found nothing "
                                         "answering at 127.0.0.1.*--coordinator-timeout"):
        training.join_processes(config)
    assert clock.sleeps == [0.5, 0.5]  # tried at 0, 0.5 and 1 s, then gave up
    clock.sleeps.clear()
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        training.wait_for_port(f"127.0.0.1:{port}", 5, "process 1 of 2")
    assert clock.sleeps == []  # joined on the first try


@pytest.mark.parametrize("backend, flags, match", [
    ("torch", [], "KERAS_BACKEND: got 'torch'"),
    ("jax", ["--strategy", "mirrored"], "strategy: got 'mirrored'"),
    ("tensorflow", ["--strategy", "data-parallel"], "strategy: got 'data-parallel'"),
    ("tensorflow", ["--coordinator", "h:1", "--num-processes", "2"], "KERAS_BACKEND=jax"),
    ("jax", ["--coordinator", "nohost", "--num-processes", "2", "--strategy",
             "data-parallel"], "coordinator: got 'nohost'"),
    ("jax", ["--coordinator", "h:1", "--strategy", "data-parallel"], "num_processes: got 1"),
    ("jax", ["--coordinator", "h:1", "--num-processes", "2"], "needs --strategy data-par"),
    ("jax", ["--num-processes", "2", "--process-id", "2"], "process_id: got 2"),
    ("jax", ["--coordinator", "h:1", "--num-processes", "2", "--strategy", "data-parallel",
             "--pipeline", "tfdata"], "use --pipeline memory"),
    ("jax", ["--pipeline", "disk"], "pipeline: got 'disk'"),
    ("jax", ["--mixup", "0.2"], "mixup: --mixup runs in the tf.data pipeline"),
    ("tensorflow", ["--pipeline", "memory", "--rotation", "10"], "rotation: --rotation"),
    ("jax", ["--crop", "resized"], "crop: the memory pipeline"),
    ("jax", ["--coordinator-timeout", "0"], "coordinator_timeout: got 0"),
])
def test_bad_backend_flags_name_the_flag(monkeypatch, tmp_path, backend, flags, match):
    """Refused before any work (nothing written), whichever backend the suite runs."""
    monkeypatch.setattr(keras.backend, "backend", lambda: backend)
    out = tmp_path / "run"
    result = run_main(cli.train_main, "--data-dir", tmp_path, "--output-dir", out, *flags)
    assert result.returncode == 2 and match in result.stderr, result.stderr
    assert not out.exists()


def test_pipeline_and_augmentation_follow_the_backend(monkeypatch):
    config = training.TrainConfig()
    assert training.pipeline_of(config) == "tfdata" and not training.augments_in_model(config)
    assert training.augments_in_model(training.TrainConfig(pipeline="memory"))
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    assert training.pipeline_of(config) == "memory" and training.augments_in_model(config)
    assert training.augments_in_model(training.TrainConfig(pipeline="tfdata"))
    assert training.resolve_precision("auto") == "float32"  # JAX on a CPU


def test_precision_auto_under_jax_follows_the_gpu(monkeypatch):
    import types

    import jax

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    for capability, policy in (("9.0", "mixed_bfloat16"), ("7.5", "mixed_float16")):
        gpu = types.SimpleNamespace(platform="gpu", compute_capability=capability)
        monkeypatch.setattr(jax, "devices", lambda gpu=gpu: [gpu])
        assert training.gpu_capability() == int(capability[0])
        assert training.resolve_precision("auto") == policy
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(platform="cpu")])
    assert training.gpu_capability() is None and training.resolve_precision("auto") == "float32"


def test_memory_pipeline_reads_the_pixels_tf_data_reads(folder):
    """Same files, same order, same pixels: exactly for PNG; JPEG within a few levels
    (PIL and TensorFlow run libjpeg with different IDCT / chroma upsampling)."""
    from keras_resnet.sources import folder_files

    kwargs = {"data_dir": str(folder), "validation_size": 6, "seed": 0}
    mem = arrays.load_memory_splits(**kwargs)
    tfd = D.load_splits(**kwargs, cache="memory")
    assert (mem.num_train, mem.num_validation, mem.num_test) == (24, 6, 30)
    assert mem.class_names == tfd.class_names and mem.image_size == tfd.image_size == (16, 16)
    files = folder_files(str(folder), 6, None, None, None, 0)
    for ours, theirs, paths in ((mem.train, tfd.train, files.train[0]),
                                (mem.test, tfd.test, files.test[0])):
        images = np.stack([x for x, _ in theirs.as_numpy_iterator()])
        labels = np.array([y for _, y in theirs.as_numpy_iterator()])
        png = np.array([p.endswith(".png") for p in paths])
        assert 0 < png.sum() < len(png)
        np.testing.assert_array_equal(ours[0][png], images[png])
        diff = np.abs(ours[0][~png].astype(int) - images[~png])
        assert diff.max() <= 8 and diff.mean() < 2.0  # random pixels: the worst case
        np.testing.assert_array_equal(ours[1], labels)
    np.testing.assert_allclose(mem.mean, tfd.mean, atol=1.0)  # JPEG: see above
    np.testing.assert_allclose(mem.std, tfd.std, atol=1.0)
    assert mem.train[0].dtype == np.uint8 and mem.report["train"]["cache"] == "memory"


def test_memory_pipeline_refuses_what_does_not_fit_before_decoding(folder, monkeypatch):
    monkeypatch.setattr(arrays, "decode_files", lambda *a: pytest.fail("decoded"))
    with pytest.raises(D.DataError, match=r"60 decoded images of 16x16 = 0.00 GiB, more than "
                                          r"the 0.00 GiB.*--pipeline tfdata"):
        arrays.load_memory_splits(data_dir=str(folder), validation_size=6, budget=1000)


def test_memory_pipeline_decodes_other_sizes_and_drops_broken_files(tmp_path):
    from PIL import Image

    wide = tmp_path / "wide.png"
    Image.fromarray(np.full((20, 40, 3), 200, np.uint8)).save(wide)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    images, labels, dropped = arrays.decode_files([str(wide), str(broken)], [1, 0], (16, 16))
    assert images.shape == (1, 16, 16, 3) and labels.tolist() == [1] and dropped == 1
    assert np.all(images == 200)


def test_every_process_gets_its_own_equal_share_of_arrays():
    from keras_resnet.sources import shard_split

    images, labels = np.arange(11) * 10, np.arange(11)
    shares = [shard_split(images, labels, (2, i)) for i in (0, 1)]
    assert [s[1].tolist() for s in shares] == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    np.testing.assert_array_equal(shares[1][0], shares[1][1] * 10)


def test_batch_feed_shuffles_each_epoch_and_one_hots():
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(3, axis=3)
    labels = np.arange(10, dtype=np.int32) % 3
    feed = arrays.BatchFeed(images, labels, 4, 3, shuffle=True, seed=1)
    assert len(feed) == 2  # the partial batch is dropped
    first = np.concatenate([feed[i][0][:, 0, 0, 0] for i in range(2)])
    x, y = feed[0]
    assert x.dtype == np.float32 and y.shape == (4, 3)
    np.testing.assert_array_equal(np.argmax(y, 1), x[:, 0, 0, 0].astype(int) % 3)
    feed.on_epoch_end()
    second = np.concatenate([feed[i][0][:, 0, 0, 0] for i in range(2)])
    assert len(set(first)) == 8 and not np.array_equal(first, second)
    ordered = arrays.BatchFeed(images, None, 4, 3)
    assert len(ordered) == 3 and ordered[2].shape == (2, 1, 1, 3)


def test_pad_crop_moves_each_image_by_at_most_the_padding():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (32, 12, 12, 3)).astype("float32")  # no zero pixels
    out = np.asarray(RandomPadCrop(3, seed=0)(images, training=True))
    shifts = set()
    for image, moved in zip(images, out, strict=True):
        found = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
                 if np.array_equal(moved, _shift(image, dy, dx))]
        assert found, "not a shift of at most 3 pixels"
        shifts.add(found[0])
    assert len(shifts) > 5  # each image draws its own offset
    np.testing.assert_array_equal(RandomPadCrop(3)(images, training=False), images)


def _shift(image, dy, dx):
    h, w, _ = image.shape
    padded = np.pad(image, ((3, 3), (3, 3), (0, 0)))
    return padded[3 - dy:3 - dy + h, 3 - dx:3 - dx + w]


def test_in_model_augmentation_keeps_xla_on(recwarn):
    config = D.AugmentConfig(color_jitter=0.2, erasing=0.5, in_model=True)
    augmenter = build_augmenter(config, (16, 16), seed=0)
    model = keras.Sequential([keras.Input((16, 16, 3)), augmenter,
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
    model.compile("sgd", "mse", jit_compile=True)
    model.fit(np.ones((4, 16, 16, 3), "float32"), np.zeros((4, 2), "float32"), verbose=0)
    assert model.jit_compile
    assert not [w for w in recwarn if "jit_compile=True" in str(w.message)]


def test_evaluate_takes_arrays():
    model = keras.Sequential([keras.Input((2, 2, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    images = np.random.default_rng(0).integers(0, 256, (7, 2, 2, 3)).astype(np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2, 0])
    report = evaluation.evaluate(model, (images, labels), ["a", "b", "c"], tta_flip=True,
                                 batch_size=3)
    assert report["num_images"] == 7 and np.sum(report["confusion_matrix"]) == 7
    plain = model.predict(images.astype("float32"), verbose=0)
    mirrored = model.predict(images[:, :, ::-1].astype("float32"), verbose=0)
    pred = np.argmax(plain + mirrored, 1)  # flip TTA averages the logits
    assert report["top1"] == round(float(np.mean(pred == labels)), 4)
    single = round(float(np.mean(np.argmax(plain, 1) == labels)), 4)
    assert report["top1_single_view"] == single


def test_shifted_tta_averages_six_views_with_a_reflected_border():
    """tta_shift=1 averages the image and its mirror, each as is and moved by (+1, +1)
    and (-1, -1) pixels with a reflected border (NumPy's reflect pad is the reference);
    the report gives the figures of one and of two (flip) views beside it."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4, 5, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(4)])
    images = np.random.default_rng(1).integers(0, 256, (9, 4, 5, 3)).astype(np.uint8)
    labels = np.arange(9) % 4

    def logits(x):
        return model.predict(x.astype("float32"), verbose=0)

    def shifted(x, d):
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
        return padded[:, 1 - d:5 - d, 1 - d:6 - d]

    views = [v for d in (0, 1, -1) for v in (shifted(images, d),
                                              shifted(images[:, :, ::-1], d))]
    assert np.array_equal(views[2][:, 1:, 1:], images[:, :-1, :-1])  # +1: down and right
    expected = np.argmax(np.mean([logits(v) for v in views], axis=0), 1)
    report = evaluation.evaluate(model, (images, labels), list("abcd"), tta_flip=True,
                                 tta_shift=1, batch_size=4)
    assert report["top1"] == round(float(np.mean(expected == labels)), 4)
    assert report["tta_shift"] == 1
    flip = np.argmax(logits(views[0]) + logits(views[1]), 1)
    assert report["top1_flip_only"] == round(float(np.mean(flip == labels)), 4)
    single = np.argmax(logits(images), 1)
    assert report["top1_single_view"] == round(float(np.mean(single == labels)), 4)
    probs, _ = evaluation.predict_probabilities(model, (images, labels), tta_flip=True,
                                                tta_shift=1)
    assert np.array_equal(np.argmax(probs, 1), expected)


def test_softmax_of_arrays_is_numpy_and_keras_alike():
    """NumPy (no program to compile under JAX), equal to keras.ops.softmax, stable for
    large logits."""
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0], [-5.0, -5.0, -5.0]])
    probs = evaluation.softmax(logits)
    assert isinstance(probs, np.ndarray) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, keras.ops.softmax(logits.astype("float32")), atol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    assert probs[1].tolist() == [1.0, 0.0, 0.0] and np.allclose(probs[2], 1 / 3)


@pytest.mark.slow
def test_benchmark_trains_beside_pytorch(jax_env):
    """As on the GPU machines: TensorFlow is not there (for the workers nor the parent)."""
    from helpers import run_script

    env = {"PYTHONPATH": jax_env["PYTHONPATH"]}
    result = run_script("benchmark_training.py", "--backend", "jax", "--model", "resnet10t",
                        "--batch-size", "8", "--steps", "1", "--rounds", "2", "--warmup", "1",
                        timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    keras_side, torch_side = report["sides"]["keras"], report["sides"]["torch"]
    assert keras_side["xla"] and keras_side["policy"] == "float32"
    assert len(keras_side["img_s_runs"]) == len(torch_side["img_s_runs"]) == 2
    assert report["keras_over_torch"] == pytest.approx(
        keras_side["img_s_median"] / torch_side["img_s_median"], rel=0.01)
    assert report["backend"] == "jax" and report["model"] == "resnet10t"
    assert "cores" in report["machine"]
    assert keras_side["device"] == torch_side["device"] == "CPU"
    assert keras_side["onednn"] is None  # TensorFlow was never imported
    refused = run_script("benchmark_training.py", "--backend", "jax", "--epochs", "1")
    assert refused.returncode == 2 and "--epochs: needs --data-dir" in refused.stderr
    refused = run_script("benchmark_training.py", "--backend", "jax", "--model", "resnet19",
                         timeout=120, env=env)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "--model: got 'resnet19'; one of resnet10t, resnet18" in refused.stderr
