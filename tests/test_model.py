import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_resnet as kr


def trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize("depth, expected", [
    (18, 11_689_512), (34, 21_797_672), (50, 25_557_032),
    (101, 44_549_160), (152, 60_192_808)])
def test_imagenet_parameter_counts_equal_torchvision(depth, expected):
    model = kr.build_resnet(depth, classes=1000, stem="imagenet")
    assert trainable_count(model) == expected


@pytest.mark.parametrize("name, expected", [
    ("resnext50_32x4d", 25_028_904),   # torchvision
    ("wide_resnet50_2", 68_883_240),   # torchvision
    ("resnet50d", 25_576_264),         # timm
    ("resnet18d", 11_708_744),         # timm
    ("resnet10t", 5_435_488),          # timm (its resnet10t: 5.4M)
])
def test_variant_parameter_counts(name, expected):
    assert trainable_count(kr.build_model(name)) == expected


def test_cifar_resnet18_count_and_shapes():
    model = kr.build_resnet18(input_shape=(32, 32, 3), classes=10, stem="cifar")
    assert trainable_count(model) == 11_173_962
    assert model.output.shape == (None, 10)
    shapes = {i: model.get_layer(f"stage{i}_block2_out").output.shape for i in range(1, 5)}
    assert shapes == {1: (None, 32, 32, 64), 2: (None, 16, 16, 128),
                      3: (None, 8, 8, 256), 4: (None, 4, 4, 512)}


def test_documented_calls():
    assert kr.build_resnet18().output.shape == (None, 1000)
    m = kr.build_resnet18(input_shape=(224, 224, 3), classes=1000, stem="imagenet",
                          classifier_activation=None)
    assert m.get_layer("predictions").activation.__name__ == "linear"
    m = kr.build_resnet50(include_top=False, pooling="avg", input_shape=(224, 224, 3))
    assert m.output.shape == (None, 2048)
    m = kr.build_resnet18(include_top=False, input_shape=(64, 64, 3))
    assert m.output.shape == (None, 2, 2, 512)
    m = kr.build_resnet18(include_top=False, pooling="max", input_shape=(64, 64, 3))
    assert m.output.shape == (None, 512) and m.layers[-1].name == "max_pool"


def test_input_tensor():
    import keras
    inp = keras.Input((48, 48, 3))
    m = kr.build_resnet18(input_tensor=inp, classes=5, stem="cifar")
    assert m.inputs[0] is inp and m.output.shape == (None, 5)


def test_layer_names_are_stable():
    model = kr.build_resnet18(input_shape=(32, 32, 3), classes=10)
    names = [layer.name for layer in model.layers]
    assert len(names) == len(set(names))
    assert names[:8] == ["image", "stem_pad1", "stem_conv1", "stem_bn1", "stem_relu1",
                         "stem_pool_pad", "stem_pool", "stage1_block1_conv1"]
    for n in ["stage2_block1_pad1", "stage2_block1_conv1", "stage2_block1_bn2",
              "stage2_block1_down_conv", "stage2_block1_down_bn", "stage2_block1_add",
              "stage4_block2_out", "avg_pool", "predictions"]:
        assert n in names
    assert len([n for n in names if n.endswith("_add")]) == 8


def test_bn_settings_and_no_conv_bias():
    model = kr.build_resnet50(input_shape=(64, 64, 3))
    bns = [la for la in model.layers if isinstance(la, keras.layers.BatchNormalization)]
    convs = [la for la in model.layers if la.__class__.__name__ == "Conv2D"]
    assert {(b.epsilon, b.momentum) for b in bns} == {(1e-5, 0.9)}
    assert len(bns) == 53 and len(convs) == 53 and not any(c.use_bias for c in convs)


def test_zero_init_residual():
    m = kr.build_resnet18(input_shape=(32, 32, 3), zero_init_residual=True)
    assert np.all(m.get_layer("stage1_block1_bn2").gamma.numpy() == 0)
    assert np.all(m.get_layer("stage1_block1_bn1").gamma.numpy() == 1)
    m = kr.build_resnet50(input_shape=(64, 64, 3), zero_init_residual=True)
    assert np.all(m.get_layer("stage3_block2_bn3").gamma.numpy() == 0)


def test_variants_structure():
    d = kr.build_model("resnet18d", input_shape=(64, 64, 3))
    names = {la.name for la in d.layers}
    assert {"stem_conv1", "stem_conv2", "stem_conv3", "stage2_block1_down_pool"} <= names
    assert d.get_layer("stem_conv1").filters == 32
    assert d.get_layer("stage2_block1_down_conv").strides == (1, 1)
    t = kr.build_model("resnet10t", input_shape=(64, 64, 3))
    assert [t.get_layer(f"stem_conv{i}").filters for i in (1, 2, 3)] == [24, 32, 64]
    assert "stage1_block2_conv1" not in {la.name for la in t.layers}  # one block a stage
    assert t.name == "resnet10t"
    x = kr.build_model("resnext50_32x4d", input_shape=(64, 64, 3))
    assert x.get_layer("stage1_block1_conv2").groups == 32
    assert x.get_layer("stage1_block1_conv2").filters == 128
    p = kr.build_model("preact_resnet18", input_shape=(32, 32, 3), stem="cifar")
    names = [la.name for la in p.layers]
    assert "post_bn" in names and "stage1_block1_bn1" in names
    assert "stage1_block1_out" not in names and "stem_bn1" not in names
    w = kr.build_resnet18(input_shape=(32, 32, 3), width_multiplier=2, stem="cifar",
                          classes=10)
    assert w.get_layer("stage4_block2_conv2").filters == 1024


@pytest.mark.parametrize("name", list(kr.MODELS))
def test_every_variant_forward_and_keras_round_trip(name, tmp_path):
    import keras

    model = kr.build_model(name, input_shape=(32, 32, 3), stem="cifar", classes=7)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    out = np.asarray(model(x))
    assert out.shape == (2, 7)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert [la.name for la in loaded.layers] == [la.name for la in model.layers]
    np.testing.assert_array_equal(np.asarray(loaded(x)), out)


def test_initial_kernels_are_drawn_per_layer():
    model = kr.build_resnet18(input_shape=(32, 32, 3), classes=10, stem="cifar")
    kernels = [la.kernel.numpy() for la in model.layers if hasattr(la, "kernel")]
    assert len(kernels) == 21
    seen = {}
    for k in kernels:
        seen.setdefault(k.shape, []).append(k)
    for same_shape in seen.values():
        for i, a in enumerate(same_shape):
            assert not any(np.array_equal(a, b) for b in same_shape[i + 1:])
    # torchvision's kaiming_normal_(mode="fan_out", relu): std sqrt(2 / (k * k * out)).
    k = model.get_layer("stage4_block2_conv2").kernel.numpy()
    assert abs(k.mean()) < 1e-3
    assert np.std(k) == pytest.approx(np.sqrt(2 / (3 * 3 * 512)), rel=0.01)


SAME_SEED = """
import sys, hashlib, keras, numpy as np
keras.utils.set_random_seed(int(sys.argv[1]))
from keras_resnet import build_resnet18
model = build_resnet18(input_shape=(32, 32, 3), classes=10, stem="cifar")
for weights in (model.weights, [la.kernel for la in model.layers if "conv" in la.name]):
    print(hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in weights)).hexdigest())
"""


def weights_digests(seed):
    """Digests of (all weights, the conv kernels) of a ResNet-18 built after ``seed``."""
    import hashlib

    import keras

    keras.utils.set_random_seed(seed)
    model = kr.build_resnet18(input_shape=(32, 32, 3), classes=10, stem="cifar")
    return [hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in weights)).hexdigest()
            for weights in (model.weights,
                            [la.kernel for la in model.layers if "conv" in la.name])]


def test_same_seed_same_weights_in_every_process_and_conv_kernels_on_every_backend():
    """One seed, one model in every process; the conv kernels are drawn on the host
    (NumPy), so the JAX backend starts from the very kernels TensorFlow does."""
    pytest.importorskip("jax")
    from helpers import run_python

    here = weights_digests(7)
    assert here == weights_digests(7) and here[0] != weights_digests(8)[0]
    same_backend = run_python(SAME_SEED, "7", timeout=300)
    assert same_backend.returncode == 0, same_backend.stderr[-2000:]
    assert same_backend.stdout.split()[-2:] == here
    on_jax = run_python(SAME_SEED, "7", timeout=300, env={"KERAS_BACKEND": "jax"})
    assert on_jax.returncode == 0, on_jax.stderr[-2000:]
    assert on_jax.stdout.split()[-1] == here[1]


@pytest.mark.parametrize("block, filters", [(kr.basic_block, 8), (kr.bottleneck_block, 2)])
def test_preact_block_with_zeroed_residual_returns_its_input(block, filters):
    import keras

    inputs = keras.Input((6, 6, 8))
    model = keras.Model(inputs, block(inputs, filters, name="b", preact=True))
    names = {la.name for la in model.layers}
    assert "b_down_conv" not in names and "b_out" not in names
    last = "b_conv2" if block is kr.basic_block else "b_conv3"
    layer = model.get_layer(last)
    layer.kernel.assign(np.zeros(layer.kernel.shape, "float32"))
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 8)).astype("float32") - 0.5
    np.testing.assert_array_equal(np.asarray(model(x, training=False)), x)
    np.testing.assert_array_equal(np.asarray(model(x, training=True)), x)


def test_preact_network_layout():
    model = kr.build_model("preact_resnet18", input_shape=(32, 32, 3), stem="cifar")
    names = [la.name for la in model.layers]
    # No BN-ReLU after the stem conv: the first block normalises its own input.
    assert names[:4] == ["image", "stem_conv1", "stage1_block1_bn1", "stage1_block1_relu1"]
    assert model.get_layer("stage1_block1_add").input[0] is model.get_layer(
        "stem_conv1").output  # identity shortcut: the raw tensor
    down = model.get_layer("stage2_block1_down_conv")
    assert down.input is model.get_layer("stage2_block1_relu1").output
    assert names[-4:] == ["post_bn", "post_relu", "avg_pool", "predictions"]


@pytest.mark.parametrize("kwargs, match", [
    ({"depth": 19}, "depth"),
    ({"stem": "tiny"}, "stem"),
    ({"classes": 0}, "classes"),
    ({"pooling": "mean", "include_top": False}, "pooling"),
    ({"input_shape": (32, 32)}, "input_shape"),
    ({"input_shape": (0, 32, 3)}, "input_shape"),
    ({"input_shape": (16, 16, 3), "stem": "imagenet"}, "input_shape"),
    ({"weights": "/no/such/file.weights.h5"}, "weights"),
    ({"cardinality": 32}, "cardinality"),
])
def test_bad_arguments(kwargs, match):
    kwargs = {"depth": 18, **kwargs}
    with pytest.raises(ValueError, match=match):
        kr.build_resnet(kwargs.pop("depth"), **kwargs)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="model: got 'resnet17'"):
        kr.build_model("resnet17")


def test_keras_save_load_and_weights(tmp_path):
    import keras
    model = kr.build_resnet18(input_shape=(32, 32, 3), classes=10, stem="cifar")
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype("float32")
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    np.testing.assert_array_equal(model.predict(x, verbose=0), clone.predict(x, verbose=0))
    wpath = tmp_path / "m.weights.h5"
    model.save_weights(wpath)
    again = kr.build_resnet18(input_shape=(32, 32, 3), classes=10, stem="cifar",
                              weights=str(wpath))
    np.testing.assert_array_equal(model.predict(x, verbose=0), again.predict(x, verbose=0))
    with pytest.raises(ValueError, match="does not fit"):
        kr.build_resnet18(input_shape=(32, 32, 3), classes=100, stem="cifar",
                          weights=str(wpath))


def test_machine_names_the_cpu_and_its_speed_flags(tmp_path):
    from keras_resnet.benchmark import machine

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9654\n"
                    "flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 9654\nflags\t\t: fpu\n")
    line = machine(str(info))
    # TensorFlow is loaded in the test process (conftest imports keras_resnet first, as the
    # scripts do, so oneDNN is on unless TF_ENABLE_ONEDNN_OPTS=0 was set).
    onednn = "on" if os.environ.get("TF_ENABLE_ONEDNN_OPTS") != "0" else "off"
    assert line.startswith("AMD EPYC 9654, ") and line.endswith(
        f"flags: avx2 fma avx512f avx512_bf16, oneDNN {onednn}")
    assert "unknown CPU" in machine(str(tmp_path / "none"))


STDERR_AT_IMPORT = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    "I0000 00:00:1796453745.016522   13452 port.cc:153] oneDNN custom operations are on.\n"
    "W0000 00:00:1796453745.016840   13452 cuda.cc:31] a warning\n"
    "E1205 06:13:28.000001   13452 file.cc:7] an error\n"
    "Traceback (most recent call last):\n"
    "I0 is not a log line\n"
    "E0000 00:00:1796457545.019215   20574 cuda_platform.cc:52] failed call to cuInit: "
    "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n"
    "our own message: failed call to cuInit\n"
    "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"  # LiteRT, inside its hold
    "fully_quantize: 0, inference_type: 6, input_inference_type: UINT8, "
    "output_inference_type: UINT8\n"
    "ERROR: a LiteRT error\n")


@pytest.mark.parametrize("level, nvidia_driver, dropped", [
    (0, False, []), (1, True, [0, 1, 8, 9]), (2, True, [0, 1, 2, 8, 9]),
    (3, True, [0, 1, 2, 3, 6, 8, 9, 10]), (1, False, [0, 1, 6, 8, 9]),
    (2, False, [0, 1, 2, 6, 8, 9])])
def test_start_up_lines_below_the_log_level_are_dropped(level, nvidia_driver, dropped):
    """The cuInit failure is an ERROR: kept where a driver is there to fail."""
    from keras_resnet.startup import kept_lines

    lines = STDERR_AT_IMPORT.splitlines(keepends=True)
    assert kept_lines(STDERR_AT_IMPORT, level, nvidia_driver) == "".join(
        line for i, line in enumerate(lines) if i not in dropped)


@pytest.mark.parametrize("backend, import_tf", [
    ("tensorflow", "import tensorflow as tf"),
    ("jax", "tf = keras_resnet.startup.import_tensorflow()")])
def test_importing_keras_resnet_prints_no_tensorflow_start_up_lines(backend, import_tf):
    """TensorFlow 2.21 logs INFO lines as it loads, whatever TF_CPP_MIN_LOG_LEVEL says;
    keras_resnet holds them back (its default level is 2) and keeps other lines. Under
    JAX, TensorFlow loads later (Keras's set_random_seed imports it): held the same way."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(KERAS_BACKEND=backend, TF_ENABLE_ONEDNN_OPTS="1")
    code = ("import os, sys\n"
            "class Loud:  # writes a line of its own while Keras loads\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'keras': os.write(2, b'a line of our own\\n')\n"
            "sys.meta_path.insert(0, Loud())\n"
            f"import keras_resnet\n{import_tf}\n"
            "tf.config.list_physical_devices(); tf.constant(1.0) + 1\n"
            "print(os.environ['TF_CPP_MIN_LOG_LEVEL'])")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    assert run.stdout.split() == ["2"]
    from keras_resnet.startup import has_nvidia_driver

    if not has_nvidia_driver():  # the cuInit failure is dropped too (CI has no GPU)
        assert run.stderr == "a line of our own\n", run.stderr
    else:
        assert run.stderr.startswith("a line of our own\n"), run.stderr


@pytest.mark.parametrize("setting, expected", [(None, "on"), ("0", "off")])
def test_onednn_is_on_unless_the_user_turned_it_off(setting, expected):
    """keras_resnet turns TensorFlow's oneDNN kernels on before TensorFlow loads
    (TensorFlow leaves them off on AVX2-only CPUs, where training ran 2.5x slower);
    a TF_ENABLE_ONEDNN_OPTS the user set wins."""
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env["KERAS_BACKEND"] = "tensorflow"
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    code = ("import keras_resnet, tensorflow; from keras_resnet.benchmark import "
            "onednn_enabled; print('oneDNN', 'on' if onednn_enabled() else 'off')")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == f"oneDNN {expected}"


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_fused_batchnorm_trains_as_keras_batchnorm(policy):
    """The model's BatchNorm runs TensorFlow's fused kernel in training and gives Keras's
    outputs, gradients and moving statistics; inference is Keras's own path."""
    import tensorflow as tf

    from keras_resnet.model import FusedBatchNorm

    keras.config.set_dtype_policy(policy)
    x = np.random.default_rng(0).normal(2.0, 3.0, (4, 6, 6, 5)).astype("float32")
    weights = np.arange(5, dtype="float32")
    layers = [keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5),
              FusedBatchNorm(momentum=0.9, epsilon=1e-5)]
    results = []
    for layer in layers:
        layer.build(x.shape)
        layer.gamma.assign(np.linspace(0.5, 1.5, 5))
        layer.beta.assign(np.linspace(-1.0, 1.0, 5))
        inputs = tf.cast(tf.constant(x), layer.compute_dtype)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            y = layer(inputs, training=True)
            loss = tf.reduce_sum(tf.cast(y, "float32") ** 2 * weights)
        grads = tape.gradient(loss, [inputs, layer.gamma, layer.beta])
        results.append([np.asarray(tf.cast(t, "float32")) for t in (y, *grads)]
                       + [layer.moving_mean.numpy(), layer.moving_variance.numpy(),
                          np.asarray(tf.cast(layer(inputs, training=False), "float32"))])
        assert y.dtype == layer.compute_dtype
    assert np.abs(results[1][3]).max() > 1  # the gamma gradient is not trivially zero
    tol = 1e-5 if policy == "float32" else 1e-2  # bfloat16 outputs: 8 bits of mantissa
    for keras_value, fused_value in zip(*results, strict=True):
        scale = max(1.0, float(np.abs(keras_value).max()))
        np.testing.assert_allclose(fused_value, keras_value, atol=tol * scale)
    graph = tf.function(lambda t: layers[1](t, training=True)).get_concrete_function(
        tf.TensorSpec(x.shape, layers[1].compute_dtype)).graph
    assert any(op.type.startswith("FusedBatchNorm") for op in graph.get_operations())
    model = kr.build_resnet18(stem="cifar", input_shape=(32, 32, 3), classes=10)
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bns) == 20 and all(isinstance(layer, FusedBatchNorm) for layer in bns)
