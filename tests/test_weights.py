"""Pretrained weights in (.pth, .safetensors, "imagenet") and out (save_torch_weights)."""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

import keras_resnet as kr
from keras_resnet import weights as W
from keras_resnet.torch_weights import keras_to_torch_name, torch_to_keras_name

torch = pytest.importorskip("torch")  # the dev extra installs it; the reference needs it


def reference(name, classes=1000, seed=0):
    from keras_resnet.torch_reference import build_reference, randomize_bn_statistics

    torch.manual_seed(seed)
    options = kr.MODELS[name]
    return randomize_bn_statistics(
        build_reference(options, classes, options.get("stem", "imagenet")), seed).eval()


def torch_logits(ref, x):
    with torch.no_grad():
        return ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


def images(size=64, seed=0):
    return np.random.default_rng(seed).normal(size=(2, size, size, 3)).astype("float32")


def save(ref, path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    else:
        torch.save(ref.state_dict(), path)
    return str(path)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_file_gives_reference_logits(name, suffix, tmp_path):
    ref = reference(name, classes=10)
    path = save(ref, tmp_path / f"w{suffix}")
    model = kr.build_model(name, input_shape=(64, 64, 3), classes=10,
                           classifier_activation=None, weights=path)
    x = images()
    expected = torch_logits(ref, x)
    np.testing.assert_allclose(np.asarray(model(x, training=False)), expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet18d", "resnet10t",
                                  "preact_resnet18"])
def test_save_torch_weights_loads_strictly_into_the_reference(name, tmp_path):
    from safetensors.torch import load_file

    ref = reference(name, classes=10, seed=1)
    model = kr.build_model(name, input_shape=(64, 64, 3), classes=10,
                           classifier_activation=None, weights=save(ref, tmp_path / "a.pth"))
    path = kr.save_torch_weights(model, tmp_path / "b.safetensors")
    assert os.listdir(tmp_path) == ["a.pth", "b.safetensors"] or sorted(
        os.listdir(tmp_path)) == ["a.pth", "b.safetensors"]  # no temporary file left
    fresh = reference(name, classes=10, seed=2)
    fresh.load_state_dict(load_file(path), strict=True)
    x = images(seed=3)
    np.testing.assert_allclose(torch_logits(fresh, x), np.asarray(model(x, training=False)),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(kr.MODELS))
def test_layer_names_map_both_ways(name):
    model = kr.build_model(name, input_shape=(64, 64, 3), classes=10)
    names = {layer.name for layer in model.layers}
    layout = {"deep_stem": "stem_conv3" in names, "preact": "post_bn" in names,
              "avg_down": any(n.endswith("_down_pool") for n in names)}
    for layer in model.layers:
        if layer.weights:
            module = keras_to_torch_name(layer.name, **layout)
            back = torch_to_keras_name(module, deep_stem=layout["deep_stem"],
                                       avg_down=layout["avg_down"])
            assert back == layer.name, (layer.name, module)


def test_a_mismatch_names_the_first_layer_that_does_not_fit(tmp_path):
    path = save(reference("resnet18"), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="no weights for layer 'stage1_block3_conv1'"):
        kr.build_model("resnet34", weights=path)
    with pytest.raises(ValueError, match="do not fit layer 'stem_conv1'"):
        kr.build_resnet18(stem="cifar", weights=path)
    with pytest.raises(ValueError, match="do not fit layer 'predictions'"):
        kr.build_resnet18(classes=10, weights=path)
    with pytest.raises(ValueError, match="do not fit layer 'stage1_block1_conv1'"):
        kr.build_resnet50(weights=path)
    backbone = kr.build_resnet18(include_top=False, pooling="avg", weights=path)  # no fc
    assert backbone.output.shape == (None, 512)


def test_a_keras_file_that_does_not_fit_is_one_error_not_a_warning(tmp_path, monkeypatch):
    """Keras warns that unmatched layers "retain their freshly-initialized weights" and
    then raises, or goes on: one ValueError either way; other warnings pass through."""
    import warnings

    import keras

    path = str(tmp_path / "r18.weights.h5")
    kr.build_resnet18(input_shape=(32, 32, 3), classes=10, stem="cifar").save_weights(path)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"r18.weights.h5' does not fit .*predictions"):
            kr.build_resnet18(input_shape=(32, 32, 3), classes=100, stem="cifar",
                              weights=path)
    assert not [w for w in seen if "freshly-initialized" in str(w.message)]

    model = kr.build_resnet18(input_shape=(32, 32, 3), classes=10, stem="cifar")
    for said in ("Layers will retain their freshly-initialized weights.", "other news"):
        monkeypatch.setattr(keras.Model, "load_weights",
                            lambda self, p, said=said: warnings.warn(said, stacklevel=2))
        if "fresh" in said:
            with pytest.raises(ValueError, match="does not fit .*retain their fresh"):
                W.load_weights(model, path)
        else:
            with pytest.warns(UserWarning, match="other news"):
                W.load_weights(model, path)


def test_broken_weights_files_are_refused(tmp_path):
    good = save(reference("resnet18"), tmp_path / "good.pth")
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes(Path(good).read_bytes()[:100_000])
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    (tmp_path / "noise.safetensors").write_bytes(os.urandom(256))
    for bad in ("cut.pth", "notes.pth", "noise.safetensors"):
        with pytest.raises(ValueError, match=f"weights: .*{bad}"):
            kr.build_resnet18(weights=str(tmp_path / bad))
    with pytest.raises(ValueError, match="must end in .pth"):
        (tmp_path / "w.npz").write_bytes(b"x")
        kr.build_resnet18(weights=str(tmp_path / "w.npz"))
    with pytest.raises(ValueError, match="file not found"):
        kr.build_resnet18(weights=str(tmp_path / "missing.pth"))


def test_checkpoint_reader_runs_no_code(tmp_path):
    """A .pth whose pickle names another callable is refused, not executed."""
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned > " + str(tmp_path / "owned"),))

    torch.save({"conv1.weight": torch.zeros(1), "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="posix.system is not allowed|is not allowed"):
        W.read_checkpoint(tmp_path / "evil.pth")
    assert not (tmp_path / "owned").exists()


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    return tmp_path / "keras_home"


def test_imagenet_offline_fails_with_where_to_put_the_file(keras_home, monkeypatch):
    url, sha = W.PUBLISHED["resnet18"]
    # A port nothing listens on: the same failure as no network, refused at once (no
    # wall-clock bound here: a loaded CI machine would make one flaky).
    monkeypatch.setitem(W.PUBLISHED, "resnet18",
                        ("http://127.0.0.1:9/models/resnet18-f37072fd.pth", sha))
    with pytest.raises(ValueError) as info:
        kr.build_resnet18(weights="imagenet")
    message = str(info.value)
    assert str(keras_home / "models" / "resnet18-f37072fd.pth") in message
    assert sha in message and "download" in message
    assert url.endswith("resnet18-f37072fd.pth")


def test_imagenet_weights_from_a_file_put_in_the_cache(keras_home, monkeypatch):
    """The file a user downloads by hand is found, hash-checked, converted once."""
    ref = reference("resnet18", seed=5)
    os.makedirs(keras_home / "models")
    path = save(ref, keras_home / "models" / "resnet18-f37072fd.pth")
    sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    monkeypatch.setitem(W.PUBLISHED, "resnet18",
                        ("http://127.0.0.1:9/models/resnet18-f37072fd.pth", sha))
    model = kr.build_resnet18(weights="imagenet", classifier_activation=None,
                              input_shape=(64, 64, 3))
    x = images(seed=6)
    np.testing.assert_allclose(np.asarray(model(x, training=False)), torch_logits(ref, x),
                               rtol=1e-4, atol=1e-4)
    converted = keras_home / "models" / "keras_resnet_resnet18_imagenet.weights.h5"
    assert converted.exists()
    os.remove(path)  # the converted cache is enough from now on
    head10 = kr.build_resnet18(weights="imagenet", classes=10)
    assert head10.output.shape == (None, 10)
    np.testing.assert_array_equal(head10.get_layer("stage4_block2_conv2").get_weights()[0],
                                  model.get_layer("stage4_block2_conv2").get_weights()[0])
    features = kr.build_resnet18(weights="imagenet", include_top=False, pooling="avg")
    assert features.output.shape == (None, 512)


def test_imagenet_with_a_wrong_hash_is_refused(keras_home, monkeypatch):
    os.makedirs(keras_home / "models")
    save(reference("resnet18"), keras_home / "models" / "resnet18-f37072fd.pth")
    monkeypatch.setitem(W.PUBLISHED, "resnet18",
                        ("http://127.0.0.1:9/models/resnet18-f37072fd.pth", "0" * 64))
    with pytest.raises(ValueError, match="cannot fetch"):
        kr.build_resnet18(weights="imagenet")


def test_imagenet_for_a_variant_without_published_weights():
    with pytest.raises(ValueError, match="no published ImageNet checkpoint for "
                                         "'resnet18_cifar'"):
        kr.build_resnet18(stem="cifar", weights="imagenet")
