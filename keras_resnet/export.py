"""Export to SavedModel and TFLite / LiteRT; every artifact is checked against Keras.

Every artifact takes raw uint8 images (any batch size for the SavedModel, batch
1 for TFLite) and returns class probabilities: the normalisation is inside the
model (the ``normalize`` layer that training used), so clients need no
preprocessing code. Each one is written to a temporary path, loaded back with
its own runtime (TensorFlow; the LiteRT interpreter from ``ai-edge-litert``),
compared with the Keras model on held-out images, and only then renamed into
place. The float32 TFLite file computes small-map 3x3 convolutions by Winograd
(:mod:`keras_resnet.winograd`) unless asked not to.
"""

import json
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from keras_resnet.winograd import winograd_model

FORMATS = ("saved_model", "tflite_float32", "tflite_float16", "tflite_dynamic_int8",
           "tflite_int8")
ARTIFACT_NAMES = {"saved_model": "saved_model", "tflite_float32": "model_float32.tflite",
                  "tflite_float16": "model_float16.tflite",
                  "tflite_dynamic_int8": "model_dynamic_int8.tflite",
                  "tflite_int8": "model_int8.tflite"}
# Exact-equivalence targets (max |dprob|); int8 targets an accuracy loss instead.
MAX_ABS_DIFF = {"saved_model": 1e-4, "tflite_float32": 1e-4}
MAX_INT8_ACCURACY_DROP = 0.005


def load_source(source):
    """A ``.keras`` file, or a training run directory (its ``best.keras``)."""
    path = os.path.join(source, "best.keras") if os.path.isdir(source) else source
    if not os.path.isfile(path):
        raise ValueError(f"SOURCE: {source!r} is neither a .keras file nor a run directory "
                         "holding best.keras")
    try:
        model = keras.saving.load_model(path, compile=False)
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise ValueError(f"SOURCE: {path!r} is not a Keras model file ({e})") from None
    return as_float32(model), path


def as_float32(model):
    """The model computing in float32, whatever precision it was trained in.

    A mixed-precision model keeps float32 weights but computes in bfloat16 /
    float16; artifacts, and the checks that compare them with Keras, want the
    float32 computation: the model is cloned with every layer's dtype policy
    set to float32 and given the same weights.
    """
    if all(layer.dtype_policy.name == "float32" for layer in model.layers):
        return model
    clone = keras.models.clone_model(
        model, recursive=True,
        clone_function=lambda layer: layer.__class__.from_config(
            {**layer.get_config(), "dtype": "float32"}))
    clone.set_weights(model.get_weights())
    return clone


def read_labels(model_path):
    """Class names from ``labels.txt`` beside a model (training and export write it)."""
    folder = model_path if os.path.isdir(model_path) else os.path.dirname(model_path)
    path = os.path.join(folder, "labels.txt")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def ends_in_softmax(model):
    return getattr(model.layers[-1], "activation", None) is keras.activations.softmax


def probability_fn(model):
    """uint8 images -> float32 class probabilities (adds softmax to a logits model)."""
    softmax = not ends_in_softmax(model)

    def fn(images):
        out = tf.cast(model(tf.cast(images, tf.float32), training=False), tf.float32)
        return tf.nn.softmax(out) if softmax else out

    return fn


def input_size(model):
    h, w = model.input_shape[1:3]
    if h is None or w is None:
        raise ValueError("SOURCE: the model's input height and width must be fixed to export")
    return int(h), int(w)


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
    if fmt != "tflite_float32":
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
    return converter.convert()


class TFLiteModel:
    """A .tflite file run with the LiteRT interpreter: uint8 images -> probabilities."""

    def __init__(self, path, num_threads=None):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=os.fspath(path), num_threads=num_threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.image_size = tuple(int(s) for s in self.input["shape"][1:3])

    def invoke(self, batch):
        """Run one batch-1 tensor of exactly the model's input dtype."""
        if batch.dtype != self.input["dtype"]:
            raise ValueError(f"input dtype {batch.dtype} does not match the model's "
                             f"{np.dtype(self.input['dtype']).name} input")
        self.interpreter.set_tensor(self.input["index"], batch)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"])

    def __call__(self, images):
        """uint8 (N, H, W, 3) -> float32 probabilities (N, classes)."""
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise ValueError(f"images: expected uint8 pixels, got {images.dtype}")
        out = []
        for image in images:
            x = image[None]
            scale, zero = self.input["quantization"]
            if scale:  # a quantised float input (full-integer model)
                info = np.iinfo(self.input["dtype"])
                x = np.clip(np.round(x.astype(np.float32) / scale + zero), info.min, info.max)
            x = x.astype(self.input["dtype"])
            y = self.invoke(x)
            o_scale, o_zero = self.output["quantization"]
            if self.output["dtype"] != np.float32:
                y = (y.astype(np.float32) - o_zero) * o_scale
            out.append(y[0])
        return np.stack(out).astype(np.float32)


class SavedModelRunner:
    """A SavedModel's serving signature: uint8 images -> probabilities."""

    def __init__(self, path):
        self.fn = tf.saved_model.load(os.fspath(path)).signatures["serving_default"]
        self.image_size = tuple(int(s) for s in self.fn.structured_input_signature[1]
                                ["images"].shape[1:3])

    def __call__(self, images):
        return self.fn(images=tf.constant(images, tf.uint8))["probabilities"].numpy()


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
        drop = figures["keras_top1_accuracy"] - figures["top1_accuracy"]
        return drop <= MAX_INT8_ACCURACY_DROP, "top-1 accuracy loss <= 0.5 point"
    return True, "reported only"


def export(source, output_dir, formats=("saved_model", "tflite_float32"), images=None,
           labels=None, calibration=None, int8_io="uint8", class_names=None, winograd=True):
    """Export ``source`` to ``formats`` under ``output_dir``; returns the report.

    Args:
        winograd: compute the small-map 3x3 convs of ``tflite_float32`` by
            Winograd (:mod:`keras_resnet.winograd`): faster on CPUs, larger file.
        images, labels: held-out uint8 images (N, H, W, 3) and int labels to check
            each artifact on; without them a few random images are used (no
            accuracy figures).
        calibration: uint8 images for ``tflite_int8``.

    Raises:
        ValueError: bad arguments (checked before any work), or an artifact that
            does not reproduce the Keras model (nothing is left at its path).
    """
    formats = list(formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"formats: got {bad or formats}; allowed: {', '.join(FORMATS)}")
    if int8_io not in ("uint8", "int8"):
        raise ValueError(f"int8_io: got {int8_io!r}; allowed: uint8, int8")
    if "tflite_int8" in formats and calibration is None:
        raise ValueError("tflite_int8 needs calibration images: pass --data-dir")
    model, model_path = load_source(source)
    h, w = input_size(model)
    if images is None:
        images = np.random.default_rng(0).integers(0, 256, (16, h, w, 3), dtype=np.uint8)
        labels = np.full(len(images), -1)
    if images.shape[1:] != (h, w, 3):
        raise ValueError(f"images: shape {images.shape[1:]} does not fit the model's input "
                         f"{(h, w, 3)}")
    os.makedirs(output_dir, exist_ok=True)
    class_names = class_names or read_labels(model_path)
    if class_names:
        _atomic_write(os.path.join(output_dir, "labels.txt"),
                      "".join(f"{n}\n" for n in class_names).encode())
    reference = np.asarray(probability_fn(model)(images))
    report = {"source": model_path, "artifacts": {}}
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
                if fmt == "tflite_float32" and winograd:
                    source_model, rewritten = winograd_model(model)
                with open(staged, "wb") as f:
                    f.write(convert_tflite(source_model, fmt, calibration, int8_io))
                runner = TFLiteModel(staged)
            figures = compare(runner(images), reference, labels)
            if fmt == "tflite_float32":
                figures["winograd_convs"] = rewritten
            passed, target = check(fmt, figures)
            figures.update(passed=passed, target=target, path=final,
                           size_bytes=_size(staged))
            if fmt in MAX_ABS_DIFF and not passed:
                raise ValueError(f"{fmt}: the artifact does not reproduce the Keras model "
                                 f"({json.dumps(figures)}); nothing was written")
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(staged, final)
            _atomic_write(final + ".json", json.dumps(figures, indent=2).encode())
            report["artifacts"][fmt] = figures
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _atomic_write(os.path.join(output_dir, "export_report.json"),
                  json.dumps(report, indent=2).encode())
    return report


def latency_ms(fn, image, runs, warmup=5):
    """Median and p90 wall time (ms) of ``fn(image)`` over ``runs`` calls after
    ``warmup``, and every call's time (``times_ms``)."""
    import time

    for _ in range(warmup):
        fn(image)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(image)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": round(float(np.median(times)), 3),
            "p90_ms": round(float(np.percentile(times, 90)), 3), "times_ms": times}


def _size(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _atomic_write(path, data):
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def load_predictor(path):
    """A ``.keras`` file, run directory, SavedModel directory or ``.tflite`` file ->
    (callable uint8 images -> probabilities, (height, width), class names or None)."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "saved_model.pb")):
        runner = SavedModelRunner(path)
        return runner, runner.image_size, read_labels(os.path.dirname(os.path.abspath(path)))
    if os.path.isfile(path) and path.endswith(".tflite"):
        try:
            runner = TFLiteModel(path)
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"MODEL: {path!r} is not a valid .tflite file ({e})") from None
        return runner, runner.image_size, read_labels(path)
    model, model_path = load_source(path)
    fn = probability_fn(model)
    return (lambda images: np.asarray(fn(images))), input_size(model), read_labels(model_path)
