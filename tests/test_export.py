import json
import os
import re

import keras
import numpy as np
import pytest
from helpers import random_batchnorm_statistics, run_main, run_script, write_folder
from PIL import Image

from keras_resnet import cli as main_cli
from keras_resnet import export as E
from keras_resnet import predict as P
from keras_resnet.model import build_classifier


def export_cli(*args):
    return run_main(main_cli.export_main, *args)


def predict_cli(*args):
    return run_main(main_cli.predict_main, *args)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(write_folder(tmp_path_factory.mktemp("data"), per_class=8, size=16))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = build_classifier(image_size=(16, 16), num_classes=3, mean=(120, 115, 100),
                             std=(60, 60, 65), stem="cifar")
    random_batchnorm_statistics(model)
    path = tmp_path_factory.mktemp("model") / "model.keras"
    model.save(path)
    (path.parent / "labels.txt").write_text("cat\ndog\neel\n")
    return str(path)


@pytest.fixture(scope="module")
def exported(model_path, folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "artifacts"
    result = run_script("export_model.py", model_path, "--output-dir", str(out), "--formats",
                 ",".join(E.FORMATS), "--winograd", "--data-dir", folder,
                 "--calibration-images", "20")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout, result.stderr


def layers_with_matmul(path):
    """Names of the Keras layers whose ops in a .tflite file include a MatMul (read from
    the tensor names, e.g. ``model/stage2_block2_conv1_1/MatMul``)."""
    found = set()
    for tensor in P.TFLiteModel(path).interpreter.get_tensor_details():
        for part in tensor["name"].split(";"):
            match = re.search(r"/(\w+?)_\d+/MatMul", part)
            if match:
                found.add(match.group(1))
    return found


@pytest.mark.slow
def test_every_format_is_written_and_checked(exported, model_path):
    out, stdout, stderr = exported
    # Nothing on stderr: LiteRT's "INFO: Created TensorFlow Lite XNNPACK delegate for
    # CPU." and the converter's "fully_quantize: 0, ..." are held to the log level too.
    assert stderr == "", stderr
    report = json.loads((out / "export_report.json").read_text())
    assert set(report["artifacts"]) == set(E.ALL_FORMATS)
    for fmt, figures in report["artifacts"].items():
        assert os.path.exists(figures["path"]) and figures["num_images"] == 24
        assert json.loads((out / (E.ARTIFACT_NAMES[fmt] + ".json")).read_text()) == figures
    arts = report["artifacts"]
    for fmt in ("saved_model", "tflite_float32", E.WINOGRAD):
        assert arts[fmt]["passed"] and arts[fmt]["max_abs_diff"] <= 1e-4
        assert arts[fmt]["top1_agreement"] == 1.0
    assert arts["tflite_float16"]["max_abs_diff"] < 1e-2
    sizes = {f: arts[f]["size_bytes"] for f in arts}
    model = keras.saving.load_model(model_path)
    weight_bytes = 4 * model.count_params()
    assert sizes["saved_model"] < 1.1 * weight_bytes  # each weight stored once
    assert 0.45 < sizes["tflite_float16"] / weight_bytes < 0.55
    assert 0.2 < sizes["tflite_int8"] / weight_bytes < 0.3
    # float32 keeps direct convs: the file is the weights.
    assert 0.9 < sizes["tflite_float32"] / weight_bytes < 1.1
    assert layers_with_matmul(arts["tflite_float32"]["path"]) == {"predictions"}
    # The opt-in Winograd file: the stride-1 3x3 convs of every stage (16x16 input:
    # maps <= 16x16), whose kernels hold 16 instead of 9 values per channel pair.
    assert E.ARTIFACT_NAMES[E.WINOGRAD] == "model_float32_winograd.tflite"
    rewritten = arts[E.WINOGRAD]["winograd_convs"]
    assert len(rewritten) == 14 and {"stem_conv1", "stage4_block2_conv2"} <= set(rewritten)
    assert layers_with_matmul(arts[E.WINOGRAD]["path"]) == {"predictions", *rewritten}
    extra = sum(4 * 7 / 9 * np.prod(model.get_layer(n).kernel.shape) for n in rewritten)
    assert 0.9 < sizes[E.WINOGRAD] / (weight_bytes + extra) < 1.1
    assert (out / "labels.txt").read_text() == "cat\ndog\neel\n"
    assert "tflite_int8" in stdout and "max|dp|" in stdout
    assert not [p for p in os.listdir(out) if p.startswith(".export-") or p.endswith(".tmp")]


def test_default_export_writes_no_winograd_file(model_path, tmp_path):
    result = export_cli(model_path, "--output-dir", str(tmp_path), "--formats",
                 "tflite_float32")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["export_report.json", "labels.txt",
                                            "model_float32.tflite", "model_float32.tflite.json"]
    figures = json.loads((tmp_path / "model_float32.tflite.json").read_text())
    assert figures["passed"] and "winograd_convs" not in figures


def test_flip_tta_follows_the_run_into_the_artifact(model_path, tmp_path):
    """A run scored with --tta-flip exports artifacts that compute that score: the mean
    of the logits on the image and its mirror (two passes), as evaluate() does."""
    import shutil

    from keras_resnet import evaluation

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(model_path, run / "best.keras")
    (run / "test_metrics.json").write_text(json.dumps({"top1": 0.5, "tta_flip": True}))
    result = export_cli(str(run), "--output-dir", str(tmp_path / "out"), "--formats",
                        "tflite_float32")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "export_report.json").read_text())
    assert report["tta_flip"] and report["artifacts"]["tflite_float32"]["passed"]
    images = np.random.default_rng(2).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    model = keras.saving.load_model(model_path, compile=False)
    scored, _ = evaluation.predict_probabilities(model, (images, np.zeros(6, int)),
                                                 tta_flip=True)
    plain = np.asarray(P.probability_fn(model)(images))
    assert np.abs(scored - plain).max() > 1e-3  # the mirror view changes the answer
    tflite = P.TFLiteModel(tmp_path / "out" / "model_float32.tflite")
    np.testing.assert_allclose(np.concatenate([tflite(im[None]) for im in images]), scored,
                               atol=1e-5)
    result = export_cli(str(run), "--output-dir", str(tmp_path / "off"), "--formats",
                        "tflite_float32", "--tta-flip", "off")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not json.loads((tmp_path / "off" / "export_report.json").read_text())["tta_flip"]
    # Both views go through the network as one batch: the file holds one pass, not two
    # (two calls sharing each weight cost the full-int8 file 4 points; docs/recipe.md).
    plain = P.TFLiteModel(tmp_path / "off" / "model_float32.tflite")
    tensors = [len(m.interpreter.get_tensor_details()) for m in (tflite, plain)]
    assert tensors[0] < 1.3 * tensors[1], tensors  # two calls: 1.6x


def test_shifted_tta_follows_the_run_into_the_artifact(model_path, tmp_path):
    """A run scored with --tta-shift 1 exports artifacts averaging its six views (image
    and mirror, each also shifted by +/-1 pixel with a reflected border), computing what
    evaluate() scored; a shift the image cannot take is refused before any work."""
    import shutil

    from keras_resnet import evaluation

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(model_path, run / "best.keras")
    (run / "test_metrics.json").write_text(json.dumps({"tta_flip": True, "tta_shift": 1}))
    result = export_cli(str(run), "--output-dir", str(tmp_path / "out"), "--formats",
                        "tflite_float32")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "averages 6 views" in result.stdout
    report = json.loads((tmp_path / "out" / "export_report.json").read_text())
    assert (report["tta_shift"], report["tta_views"]) == (1, 6)
    assert report["artifacts"]["tflite_float32"]["passed"]
    images = np.random.default_rng(3).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    model = keras.saving.load_model(model_path, compile=False)
    scored, _ = evaluation.predict_probabilities(model, (images, np.zeros(5, int)),
                                                 tta_flip=True, tta_shift=1)
    flip_only, _ = evaluation.predict_probabilities(model, (images, np.zeros(5, int)),
                                                    tta_flip=True)
    assert np.abs(scored - flip_only).max() > 1e-3  # the shifted views change the answer
    tflite = P.TFLiteModel(tmp_path / "out" / "model_float32.tflite")
    np.testing.assert_allclose(np.concatenate([tflite(im[None]) for im in images]), scored,
                               atol=1e-5)
    result = export_cli(str(run), "--output-dir", str(tmp_path / "bad"), "--tta-shift", "9")
    assert result.returncode != 0 and "--tta-shift: got '9'" in result.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("keras_top1, int8_top1, n, passed", [
    (0.774, 0.769, 1000, True), (0.774, 0.768, 1000, False), (0.5, 0.5, 8, True),
    (0.75, 0.625, 8, False), (150 / 300, 149 / 300, 300, True),
    (150 / 300, 148 / 300, 300, False)])
def test_int8_target_counts_images(keras_top1, int8_top1, n, passed):
    """The full-int8 target (<= 0.5 point lost) in whole images: 5 of 1,000 passes."""
    figures = {"keras_top1_accuracy": keras_top1, "top1_accuracy": int8_top1, "num_images": n}
    assert E.check("tflite_int8", figures)[0] is passed


@pytest.mark.slow
def test_saved_model_takes_uint8_batches_and_matches_keras(exported, model_path):
    out = exported[0]
    runner = P.SavedModelRunner(out / "saved_model")
    images = np.random.default_rng(1).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    keras_probs = np.asarray(P.probability_fn(keras.saving.load_model(model_path))(images))
    for batch in (images[:1], images):
        probs = runner(batch)
        assert probs.shape == (len(batch), 3)
        np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(probs, keras_probs[:len(batch)], atol=1e-5)


@pytest.mark.slow
def test_full_integer_model_takes_raw_uint8(exported):
    out = exported[0]
    m = P.TFLiteModel(out / "model_int8.tflite")
    assert m.input["dtype"] == np.uint8 and m.output["dtype"] == np.uint8
    scale, zero = m.input["quantization"]
    assert scale == pytest.approx(1.0, rel=1e-3) and zero == 0
    with pytest.raises(ValueError, match="does not match the model's uint8 input"):
        m.invoke(np.zeros((1, 16, 16, 3), np.float32))
    f32 = P.TFLiteModel(out / "model_float32.tflite")
    with pytest.raises(ValueError, match="expected uint8 pixels, got float32"):
        f32(np.zeros((1, 16, 16, 3), np.float32))


def test_bad_export_inputs_write_nothing(model_path, folder, tmp_path):
    not_model = tmp_path / "notes.keras"
    not_model.write_text("hello")
    result = export_cli(str(not_model), "--output-dir", str(tmp_path / "a"))
    assert result.returncode == 2 and "is not a Keras model file" in result.stderr
    result = export_cli(model_path, "--output-dir", str(tmp_path / "b"),
                 "--formats", "tflite_int8")
    assert result.returncode == 2 and "needs calibration images" in result.stderr
    result = export_cli(model_path, "--output-dir", str(tmp_path / "c"),
                 "--formats", "onnx")
    assert result.returncode == 2 and "--formats: got ['onnx']" in result.stderr
    assert not any((tmp_path / d).exists() for d in "abc")


def test_a_full_disk_during_export_says_so_and_leaves_nothing_half_written(
        model_path, tmp_path, monkeypatch):
    import errno

    def full(model, fmt, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "x"))

    monkeypatch.setattr(E, "convert_tflite", full)
    r = export_cli(model_path, "--output-dir", str(tmp_path / "out"), "--formats",
                   "tflite_float32")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "No space left on device" in r.stderr and str(tmp_path / "out") in r.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["labels.txt"]  # no staging folder left


@pytest.mark.slow
def test_export_killed_mid_way_leaves_no_half_written_file(model_path, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from helpers import ROOT

    out = tmp_path / "out"
    command = [sys.executable, os.path.join(ROOT, "scripts", "export_model.py"), model_path,
               "--output-dir", str(out), "--formats", "saved_model,tflite_float32"]
    proc = subprocess.Popen(command, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # until an artifact is staged
        if out.exists() and any(n.startswith(".export-") for n in os.listdir(out)):
            time.sleep(1.0)
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the export finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    artifacts = {E.ARTIFACT_NAMES[f] for f in ("saved_model", "tflite_float32")}
    for name in os.listdir(out):  # what is there under its final name is whole and checked
        if name in artifacts:
            assert (out / (name + ".json")).exists(), name
    rerun = subprocess.run(command, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
                           capture_output=True, text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    names = set(os.listdir(out))
    assert artifacts <= names and "export_report.json" in names
    assert not [n for n in names if n.startswith(".export-") or n.endswith(".tmp")
                or n == ".lock"], names


@pytest.mark.slow
def test_predict_from_every_artifact_kind(exported, model_path, folder):
    out = exported[0]
    images = os.path.join(folder, "test", "dog")
    results = {}
    for model in (model_path, str(out / "saved_model"), str(out / "model_float32.tflite"),
                  str(out / "model_int8.tflite")):
        r = predict_cli(model, images, "--top-k", "2", "--json")
        assert r.returncode == 0, r.stderr[-2000:]
        lines = [json.loads(line) for line in r.stdout.splitlines()]
        assert len(lines) == 8 and all(len(x["top_k"]) == 2 for x in lines)
        assert {p[0] for x in lines for p in x["top_k"]} <= {"cat", "dog", "eel"}
        results[model] = lines
    keras_top = [x["top_k"][0][0] for x in results[model_path]]
    tflite_top = [x["top_k"][0][0] for x in results[str(out / "model_float32.tflite")]]
    assert keras_top == tflite_top
    # The predict.py script itself, run by its benchmark (on a folder and on one image).
    bench = run_script("benchmark_predict.py", str(out / "model_float32.tflite"), "--images",
                       images, "--rounds", "1")
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert bench.stdout.startswith("machine: ")
    result = json.loads(bench.stdout.strip().splitlines()[-1])["results"]
    figures = result[str(out / "model_float32.tflite")]
    assert figures["images"] == 8 and figures["images_per_s"] > 0
    assert figures["one_image_wall_s"] > 0


def test_predict_converts_odd_images(model_path, tmp_path):
    Image.fromarray(np.full((50, 30), 90, np.uint8)).save(tmp_path / "gray.png")
    Image.fromarray(np.full((8, 8, 4), 90, np.uint8)).save(tmp_path / "rgba.png")
    r = predict_cli(model_path, str(tmp_path), "--json", "--top-k", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(r.stdout.splitlines()) == 2


def test_predict_bad_inputs(model_path, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xffnot really")
    (tmp_path / "bad.tflite").write_bytes(b"nope")
    cases = [
        ((model_path, str(tmp_path / "empty")), "holds no files"),
        ((model_path, str(tmp_path / "broken.jpg")), "not a readable image"),
        ((model_path, str(tmp_path / "missing.png")), "does not exist"),
        ((str(tmp_path / "bad.tflite"), str(tmp_path / "broken.jpg")), "not a readable image"),
    ]
    for args, message in cases:
        r = predict_cli(*args)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr[-1000:])


@pytest.mark.slow
def test_benchmark_export_script(exported):
    out = exported[0]
    r = run_script("benchmark_export.py", str(out), "--runs", "100", "--warmup", "2",
                   "--rounds", "1", "--threads", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.stdout.startswith("machine: ") and result["machine"] in r.stdout
    assert set(result["artifacts"]) == set(E.ALL_FORMATS)
    for row in result["artifacts"].values():
        t = row["threads_2"]
        assert 0 < t["median_ms"] <= t["p90_ms"] and "threads_1" not in row


def test_mixed_precision_model_exports_in_float32(tmp_path):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(1)
        mixed = build_classifier(image_size=(8, 8), num_classes=4, mean=(120, 115, 100),
                                 std=(60, 60, 65), stem="cifar")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert mixed.get_layer("stem_conv1").compute_dtype == "bfloat16"
    path = tmp_path / "mixed.keras"
    mixed.save(path)
    model, _ = P.load_source(str(path))
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    for a, b in zip(model.get_weights(), mixed.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    images = np.random.default_rng(2).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    probs = np.asarray(P.probability_fn(model)(images))
    assert probs.dtype == np.float32
    # bfloat16 keeps ~3 significant digits: close to the mixed model, not equal.
    mixed_probs = np.asarray(P.probability_fn(mixed)(images))
    assert 0 < np.abs(probs - mixed_probs).max() < 0.05
    (tmp_path / "m.tflite").write_bytes(E.convert_tflite(model, "tflite_float32"))
    assert np.abs(P.TFLiteModel(tmp_path / "m.tflite")(images) - probs).max() < 1e-4


def test_found_by_trying_export_and_predict(model_path, folder, tmp_path):
    """Issue 14's list: each was a traceback or a silent wrong answer."""
    import shutil

    import keras

    image = os.path.join(folder, "test", "dog", "0.jpg")
    # Export into a path that cannot be a folder (a file on the way): a message.
    (tmp_path / "file").write_text("x")
    r = export_cli(model_path, "--output-dir", str(tmp_path / "file" / "out"))
    assert r.returncode == 2 and "--output-dir: cannot write to" in r.stderr
    # A .keras file that is not an image model.
    dense = tmp_path / "dense.keras"
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(dense)
    r = export_cli(str(dense), "--output-dir", str(tmp_path / "d"))
    assert r.returncode == 2 and "is not an image classifier: its input is (None, 4)" in r.stderr
    assert not (tmp_path / "d").exists()
    # A folder holding a fake saved_model.pb.
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "saved_model.pb").write_bytes(b"not a protobuf at all")
    r = predict_cli(str(tmp_path / "fake"), image)
    assert r.returncode == 2 and "is not a readable SavedModel" in r.stderr
    assert "Traceback" not in r.stderr
    # labels.txt that does not fit the model's classes.
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(model_path, run / "best.keras")
    (run / "labels.txt").write_text("cat\ndog\n")
    r = predict_cli(str(run), image)
    assert r.returncode == 2 and "names 2 classes, the model predicts 3" in r.stderr


def test_predict_warns_about_nan_outputs(model_path, tmp_path, folder):
    import keras

    model = keras.saving.load_model(model_path, compile=False)
    kernel = model.get_layer("predictions").kernel
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    model.save(tmp_path / "nan.keras")
    r = predict_cli(str(tmp_path / "nan.keras"), os.path.join(folder, "test", "dog", "0.jpg"))
    assert r.returncode == 0 and "outputs are not finite (NaN)" in r.stderr


def test_predict_batches_a_folder_and_skips_what_is_not_an_image(model_path, tmp_path):
    """A 4000x4000 photo is resized; a decompression-bomb PNG and a text file in a folder
    are skipped with a count, not fatal."""
    Image.fromarray(np.full((4000, 4000, 3), 120, np.uint8)).save(tmp_path / "big.jpg")
    Image.new("1", (14000, 14000)).save(tmp_path / "bomb.png")  # 196 Mpx: PIL refuses it
    (tmp_path / "notes.txt").write_text("not an image")
    for i in range(5):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    r = predict_cli(model_path, str(tmp_path), "--json", "--batch-size", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    paths = [json.loads(line)["path"] for line in r.stdout.splitlines()]
    assert sorted(os.path.basename(p) for p in paths) == sorted(
        ["big.jpg", *(f"{i}.png" for i in range(5))])
    assert "skipped 2 file(s)" in r.stderr
