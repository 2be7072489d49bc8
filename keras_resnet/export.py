"""Export to SavedModel and TFLite / LiteRT; every artifact is checked against Keras.

Every artifact takes raw uint8 images (any batch size for the SavedModel, batch
1 for TFLite) and returns class probabilities: the normalisation is inside the
model (the ``normalize`` layer that training used), so clients need no
preprocessing code. Each one is written to a temporary path, loaded back with
its own runtime (TensorFlow; the LiteRT interpreter from ``ai-edge-litert``),
compared with the Keras model on held-out images, and only then renamed into
place. ``tflite_float32`` keeps the converter's direct convolutions; the opt-in
``tflite_float32_winograd`` computes small-map 3x3 convolutions by Winograd
(:mod:`keras_resnet.winograd`): faster on x86 CPUs, a 1.67x larger file
(docs/benchmarks.md).
"""

import json
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from keras_resnet import atomic, locking, startup
from keras_resnet.predict import (
    MAX_TTA_SHIFT,
    SavedModelRunner,
    TFLiteModel,
    input_size,
    load_source,
    probability_fn,
    read_crop_ratio,
    read_labels,
    tta_model,
    tta_views,
)
from keras_resnet.winograd import winograd_model

# The formats exported by default (tflite_int8 when calibration images are given).
FORMATS = ("saved_model", "tflite_float32", "tflite_float16", "tflite_dynamic_int8",
           "tflite_int8")
# Opt-in: float32 with Winograd 3x3 convs; a separately named, larger file.
WINOGRAD = "tflite_float32_winograd"
ALL_FORMATS = (*FORMATS, WINOGRAD)
ARTIFACT_NAMES = {"saved_model": "saved_model", "tflite_float32": "model_float32.tflite",
                  "tflite_float16": "model_float16.tflite",
                  "tflite_dynamic_int8": "model_dynamic_int8.tflite",
                  "tflite_int8": "model_int8.tflite",
                  WINOGRAD: "model_float32_winograd.tflite"}
# Exact-equivalence targets (max |dprob|); int8 targets an accuracy loss instead.
MAX_ABS_DIFF = {"saved_model": 1e-4, "tflite_float32": 1e-4, WINOGRAD: 1e-4}
MAX_INT8_ACCURACY_DROP = 0.005


def write_saved_model(model, path):
    """SavedModel whose ``serving_default`` maps uint8 images to probabilities.

    A plain ``tf.Module`` rather than ``keras.export.ExportArchive``: the
    archive stores every weight twice on the TF backend (keras-team/keras
    #23553, open as of Keras 3.15), doubling the file and the memory of every
    server that loads it. Tracking the very ``tf.Variable``s the traced
    function captures lets TensorFlow store each once.
    """
    h, w = input_size(model)
    fn = probability_fn(model)
    module = tf.Module()
    module.model_variables = [v.value for v in model.variables]
    module.serve = tf.function(
        lambda images: {"probabilities": fn(images)},
        input_signature=[tf.TensorSpec((None, h, w, 3), tf.uint8, name="images")])
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})


def convert_tflite(model, fmt, calibration=None, int8_io="uint8"):
    """A TFLite flatbuffer (bytes) of one of the ``tflite_*`` formats.

    ``calibration``: uint8 images (N, H, W, 3) for ``tflite_int8``.
    """
    h, w = input_size(model)
    # Full-integer: a float input in 0..255 that the converter quantises to
    # uint8 / int8, so the data range maps onto the integer range.
    dtype = tf.float32 if fmt == "tflite_int8" else tf.uint8
    fn = probability_fn(model)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", lambda images: {"probabilities": fn(images)},
                         input_signature=[tf.TensorSpec((1, h, w, 3), dtype, name="images")])
    # Through a SavedModel: the converter then freezes the Keras 3 variables.
    with tempfile.TemporaryDirectory() as tmp:
        archive.write_out(tmp, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=["serve"])
        return _convert(converter, fmt, calibration, int8_io, h, w)


def _convert(converter, fmt, calibration, int8_io, h, w):
    if fmt not in ("tflite_float32", WINOGRAD):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if fmt == "tflite_float16":
        converter.target_spec.supported_types = [tf.float16]
    if fmt == "tflite_int8":
        if calibration is None or len(calibration) == 0:
            raise ValueError("tflite_int8 needs calibration images (--data-dir)")

        def representative():
            # A black and a white frame pin the input range to 0..255, so a
            # uint8 input has scale 1 and zero point 0: raw pixels go straight in.
            for value in (0, 255):
                yield [np.full((1, h, w, 3), value, np.float32)]
            for image in calibration:
                yield [image[None].astype(np.float32)]

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        io_type = {"uint8": tf.uint8, "int8": tf.int8}[int8_io]
        converter.inference_input_type = io_type
        converter.inference_output_type = io_type
    with startup.litert_lines_held():  # the quantiser's settings line
        return converter.convert()


def compare(probs, reference, labels):
    """Equivalence figures of an artifact's probabilities against Keras's."""
    agree = np.argmax(probs, 1) == np.argmax(reference, 1)
    return {"max_abs_diff": float(np.max(np.abs(probs - reference))),
            "top1_agreement": float(np.mean(agree)),
            "top1_accuracy": float(np.mean(np.argmax(probs, 1) == labels)),
            "keras_top1_accuracy": float(np.mean(np.argmax(reference, 1) == labels)),
            "num_images": len(labels)}


def check(fmt, figures):
    """Whether an artifact meets its target; (passed, description of the target)."""
    if fmt in MAX_ABS_DIFF:
        ok = figures["max_abs_diff"] <= MAX_ABS_DIFF[fmt] and figures["top1_agreement"] == 1
        return ok, f"top-1 agreement 1.0 and max |dprob| <= {MAX_ABS_DIFF[fmt]:g}"
    if fmt == "tflite_int8":
        n = figures["num_images"]  # counted in images: 5 of 1,000 is 0.5 point, exactly
        lost = round((figures["keras_top1_accuracy"] - figures["top1_accuracy"]) * n)
        return lost <= MAX_INT8_ACCURACY_DROP * n + 1e-9, "top-1 accuracy loss <= 0.5 point"
    return True, "reported only"


def export(source, output_dir, formats=("saved_model", "tflite_float32"), images=None,
           labels=None, calibration=None, int8_io="uint8", class_names=None, tta_flip=False,
           tta_shift=0):
    """Export ``source`` to ``formats`` under ``output_dir``; returns the report.

    Args:
        formats: of ``ALL_FORMATS``; ``tflite_float32_winograd`` is the opt-in
            Winograd variant of ``tflite_float32``.
        images, labels: held-out uint8 images (N, H, W, 3) and int labels to check
            each artifact on; without them a few random images are used (no
            accuracy figures).
        calibration: uint8 images for ``tflite_int8``.
        tta_flip, tta_shift: put test-time augmentation inside every artifact
            (``predict.tta_model``: one forward pass per view, all in one batch).

    Raises:
        ValueError: bad arguments (checked before any work), or an artifact that
            does not reproduce the Keras model (nothing is left at its path).
    """
    formats = list(formats)
    bad = [f for f in formats if f not in ALL_FORMATS]
    if bad or not formats:
        raise ValueError(f"formats: got {bad or formats}; allowed: {', '.join(ALL_FORMATS)}")
    if int8_io not in ("uint8", "int8"):
        raise ValueError(f"int8_io: got {int8_io!r}; allowed: uint8, int8")
    if "tflite_int8" in formats and calibration is None:
        raise ValueError("tflite_int8 needs calibration images: pass --data-dir")
    if not isinstance(tta_shift, int) or not 0 <= tta_shift <= MAX_TTA_SHIFT:
        raise ValueError(f"tta_shift: got {tta_shift!r}; must be an integer in "
                         f"0..{MAX_TTA_SHIFT}")
    model, model_path = load_source(source)
    model = tta_model(model, tta_flip, tta_shift)
    h, w = input_size(model)
    if images is None:
        images = np.random.default_rng(0).integers(0, 256, (16, h, w, 3), dtype=np.uint8)
        labels = np.full(len(images), -1)
    if images.shape[1:] != (h, w, 3):
        raise ValueError(f"images: shape {images.shape[1:]} does not fit the model's input "
                         f"{(h, w, 3)}")
    with locking.hold(output_dir):  # one export at a time into a folder
        remove_leftovers(output_dir)
        class_names = class_names or read_labels(model_path)
        if class_names:
            atomic.write(os.path.join(output_dir, "labels.txt"),
                          "".join(f"{n}\n" for n in class_names).encode())
        crop_ratio = read_crop_ratio(model_path)
        if crop_ratio != 1.0:  # predict.py crops as evaluation did
            atomic.write(os.path.join(output_dir, "preprocessing.json"),
                          json.dumps({"crop_ratio": crop_ratio}).encode())
        reference = np.asarray(probability_fn(model)(images))
        report = {"source": model_path, "tta_flip": bool(tta_flip), "tta_shift": tta_shift,
                  "tta_views": len(tta_views(tta_flip, tta_shift)), "artifacts": {}}
        for fmt in formats:
            final = os.path.join(output_dir, ARTIFACT_NAMES[fmt])
            tmp = tempfile.mkdtemp(prefix=".export-", dir=output_dir)
            try:
                staged = os.path.join(tmp, ARTIFACT_NAMES[fmt])
                if fmt == "saved_model":
                    write_saved_model(model, staged)
                    runner = SavedModelRunner(staged)
                else:
                    source_model, rewritten = model, []
                    if fmt == WINOGRAD:
                        source_model, rewritten = winograd_model(model)
                    with open(staged, "wb") as f:
                        f.write(convert_tflite(source_model, fmt, calibration, int8_io))
                    runner = TFLiteModel(staged)
                figures = compare(runner(images), reference, labels)
                if fmt == WINOGRAD:
                    figures["winograd_convs"] = rewritten
                passed, target = check(fmt, figures)
                figures.update(passed=passed, target=target, path=final,
                               size_bytes=_size(staged))
                if fmt in MAX_ABS_DIFF and not passed:
                    raise ValueError(f"{fmt}: the artifact does not reproduce the Keras model "
                                     f"({json.dumps(figures)}); nothing was written")
                if os.path.isdir(final):  # moved aside whole (one rename), deleted with tmp
                    os.replace(final, os.path.join(tmp, "previous"))
                os.replace(staged, final)
                atomic.write(final + ".json", json.dumps(figures, indent=2).encode())
                report["artifacts"][fmt] = figures
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        atomic.write(os.path.join(output_dir, "export_report.json"),
                      json.dumps(report, indent=2).encode())
        return report


def remove_leftovers(output_dir):
    """Staging folders and temporary files that a killed export left (the caller holds
    the folder's lock, so no live export is writing them)."""
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith(".export-") and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
    atomic.remove_temp_files(output_dir)


def _size(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


