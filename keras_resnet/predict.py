"""Run a trained model from any of its forms: ``.keras``, SavedModel, ``.tflite``.

Every form takes raw uint8 images (N, H, W, 3) and returns float32 class
probabilities; the class names come from the ``labels.txt`` that training and
export write beside the model.
"""

import os

import keras
import numpy as np
from keras import ops

from keras_resnet import evaluation, startup


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


def _beside(model_path, name):
    """The path of file ``name`` in the run folder of ``model_path`` (a file or folder)."""
    folder = model_path if os.path.isdir(model_path) else os.path.dirname(model_path)
    return os.path.join(folder, name)


def read_labels(model_path):
    """Class names from ``labels.txt`` beside a model (training and export write it)."""
    path = _beside(model_path, "labels.txt")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def read_crop_ratio(model_path):
    """The eval crop ratio from ``preprocessing.json`` beside a model (training and
    export write it): prediction resizes and centre-crops as evaluation did. 1.0
    (the whole image, as far as its aspect allows) when there is none."""
    import json

    path = _beside(model_path, "preprocessing.json")
    if not os.path.exists(path):
        return 1.0
    with open(path) as f:
        return float(json.load(f).get("crop_ratio", 1.0))


def scored_tta(model_path):
    """``(tta_flip, tta_shift)``: the test-time augmentation the run beside
    ``model_path`` scored its test set with (``test_metrics.json``); (False, 0) when
    there is no such record."""
    import json

    path = _beside(model_path, "test_metrics.json")
    if not os.path.exists(path):
        return False, 0
    with open(path) as f:
        metrics = json.load(f)
    return bool(metrics.get("tta_flip", False)), int(metrics.get("tta_shift", 0))


def ends_in_softmax(model):
    return getattr(model.layers[-1], "activation", None) is keras.activations.softmax


MAX_TTA_SHIFT = 4  # pixels; a reflected shift stays below the image side (>= 8)


def tta_views(flip=True, shift=0):
    """The views test-time augmentation averages, as (mirrored, shift) pairs, the image
    itself first: with ``flip`` its left-right mirror too; with ``shift`` > 0 each of
    those also moved by (+shift, +shift) and (-shift, -shift) pixels (airbench's TTA)."""
    mirrors = (False, True) if flip else (False,)
    shifts = (0, shift, -shift) if shift else (0,)
    return tuple((mirrored, s) for s in shifts for mirrored in mirrors)


@keras.saving.register_keras_serializable("keras_resnet")
class TestTimeViews(keras.layers.Layer):
    """NHWC images -> their ``views`` (``tta_views`` pairs) stacked view by view in one
    batch (V*N images). A shifted view is filled by reflection at the border, as in
    airbench's TTA (Keras's ``RandomTranslation`` would draw a random shift)."""

    def __init__(self, views=((False, 0), (True, 0)), **kwargs):
        super().__init__(**kwargs)
        self.views = tuple((bool(m), int(s)) for m, s in views)

    def call(self, images):
        out = []
        for mirrored, shift in self.views:
            x = ops.flip(images, axis=2) if mirrored else images
            if shift:
                p = abs(shift)
                h, w = ops.shape(images)[1:3]
                x = ops.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
                x = x[:, p - shift:p - shift + h, p - shift:p - shift + w]
            out.append(x)
        return out[0] if len(out) == 1 else ops.concatenate(out, axis=0)

    def get_config(self):
        return {**super().get_config(), "views": [list(v) for v in self.views]}


@keras.saving.register_keras_serializable("keras_resnet")
class ViewsAxis(keras.layers.Layer):
    """(V*N, C) outputs of ``TestTimeViews`` -> (N, V, C): each image's views side by
    side, so that a batched predict keeps them together. Slices, not a reshape: JAX's
    symbolic batch dimension does not reshape to (V, -1, C)."""

    def __init__(self, num_views=2, **kwargs):
        super().__init__(**kwargs)
        self.num_views = int(num_views)

    def call(self, outputs):
        n = ops.shape(outputs)[0] // self.num_views
        return ops.stack([outputs[i * n:(i + 1) * n] for i in range(self.num_views)], axis=1)

    def get_config(self):
        return {**super().get_config(), "num_views": self.num_views}


@keras.saving.register_keras_serializable("keras_resnet")
class MeanOfViews(keras.layers.Layer):
    """(N, V, C) -> (N, C): the mean over each image's views (``ViewsAxis``)."""

    def call(self, outputs):
        return ops.mean(outputs, axis=1)


def view_model(model, views):
    """``model`` run on ``views`` of its input image (``tta_views`` pairs) in one batch:
    (N, V, C) outputs. Evaluation feeds it batches of 1/V the size, so that memory
    stays that of one batch and one predict function serves every view."""
    inputs = keras.Input(model.input_shape[1:], name="image")
    outputs = model(TestTimeViews(views, name="tta_views")(inputs))
    return keras.Model(inputs, ViewsAxis(len(views), name="tta_axis")(outputs),
                       name=model.name)


def tta_model(model, flip=True, shift=0):
    """``model`` with test-time augmentation inside: the mean of its logits over
    ``tta_views(flip, shift)`` (what ``evaluate(..., tta_flip, tta_shift)`` scores), so
    that an exported artifact computes the figure the run reported. Costs one forward
    pass per view.

    All views go through the network as one batch (``view_model``) rather than as calls
    of it each: with two calls every weight and folded bias feeds two convolutions, and
    the full-int8 file lost 4 points of top-1 that way (measured; docs/recipe.md)."""
    views = tta_views(flip, shift)
    if len(views) == 1:
        return model
    if ends_in_softmax(model):
        raise ValueError(f"tta: {model.name!r} ends in a softmax; test-time augmentation "
                         "averages logits (a trained classifier's output)")
    stacked = view_model(model, views)
    return keras.Model(stacked.input, MeanOfViews(name="tta_mean")(stacked.output),
                       name=model.name)


def probability_fn(model):
    """uint8 images -> float32 class probabilities (adds softmax to a logits model)."""
    softmax = not ends_in_softmax(model)

    def fn(images):
        out = ops.cast(model(ops.cast(images, "float32"), training=False), "float32")
        return ops.softmax(out, axis=-1) if softmax else out

    return fn


def input_size(model, path=None):
    """(height, width) of an image model's input (``path``: its file, for messages)."""
    shape = model.input_shape
    if isinstance(shape, list) or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"SOURCE: {os.fspath(path) if path else model.name!r} is not an image "
                         "classifier: its input is "
                         f"{shape}; expected (None, height, width, 3)")
    h, w = shape[1:3]
    if h is None or w is None:
        raise ValueError("SOURCE: the model's input height and width must be fixed to export")
    return int(h), int(w)


class TFLiteModel:
    """A .tflite file run with the LiteRT interpreter: uint8 images -> probabilities."""

    def __init__(self, path, num_threads=None):
        from ai_edge_litert.interpreter import Interpreter

        with startup.litert_lines_held():  # its delegate's INFO line, at the first allocation
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
        tf = startup.import_tensorflow()
        try:
            self.fn = tf.saved_model.load(os.fspath(path)).signatures["serving_default"]
        except Exception as e:  # noqa: BLE001 (protobuf DecodeError, OSError, KeyError, ...)
            raise ValueError(f"MODEL: {os.fspath(path)!r} is not a readable SavedModel with a "
                             f"serving signature ({type(e).__name__}: {e})") from None
        self.image_size = tuple(int(s) for s in self.fn.structured_input_signature[1]
                                ["images"].shape[1:3])

    def __call__(self, images):
        return self.fn(images=np.asarray(images, np.uint8))["probabilities"].numpy()


def load_predictor(path):
    """A ``.keras`` file, run directory, SavedModel directory or ``.tflite`` file ->
    (callable uint8 images -> probabilities, (height, width), class names or None,
    eval crop ratio)."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "saved_model.pb")):
        runner = SavedModelRunner(path)
        folder = os.path.dirname(os.path.abspath(path))
        return runner, runner.image_size, read_labels(folder), read_crop_ratio(folder)
    if os.path.isfile(path) and path.endswith(".tflite"):
        try:
            runner = TFLiteModel(path)
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"MODEL: {path!r} is not a valid .tflite file ({e})") from None
        return runner, runner.image_size, read_labels(path), read_crop_ratio(path)
    model, model_path = load_source(path)
    return (keras_predictor(model), input_size(model, model_path), read_labels(model_path),
            read_crop_ratio(model_path))


def keras_predictor(model):
    """uint8 images -> NumPy probabilities with a Keras model.

    Under JAX through ``predict_on_batch``, one compiled program per batch shape: an
    eager JAX call compiles each op by itself (ResNet-18: 119 small programs, seconds
    before the first answer). Elsewhere an eager call, which needs no tracing.
    """
    if keras.backend.backend() != "jax":
        fn = probability_fn(model)
        return lambda images: np.asarray(fn(images))
    softmax = not ends_in_softmax(model)

    def predict(images):
        out = np.asarray(model.predict_on_batch(np.asarray(images, "float32")), "float32")
        return evaluation.softmax(out) if softmax else out

    return predict


def image_batches(files, image_size, crop_ratio=1.0, batch_size=32):
    """(paths, uint8 images) in batches, decoded in parallel; files that do not
    decode are left out. TensorFlow's decoder when it is installed (the one
    evaluation used), else PIL's (``keras_resnet.arrays``, the memory pipeline's)."""
    from keras_resnet.training import tensorflow_available

    if tensorflow_available():
        tf = startup.import_tensorflow()
        from keras_resnet import data

        batches = tf.data.Dataset.from_tensor_slices(list(files)).map(
            lambda p: (p, data.decode_image(tf.io.read_file(p), image_size, crop_ratio)),
            num_parallel_calls=tf.data.AUTOTUNE).ignore_errors().batch(batch_size)
        for paths, images in batches.prefetch(1):
            yield [p.decode() for p in paths.numpy()], images.numpy()
        return
    from concurrent.futures import ThreadPoolExecutor

    from keras_resnet.arrays import DECODE_THREADS, decode_file

    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            decoded = pool.map(lambda f: decode_file(f, image_size, crop_ratio), chunk)
            pairs = [(f, im) for f, im in zip(chunk, decoded, strict=True) if im is not None]
            if pairs:
                yield [f for f, _ in pairs], np.stack([im for _, im in pairs])
