import keras
import numpy as np
import pytest
from helpers import random_batchnorm_statistics

from keras_resnet import build_resnet18
from keras_resnet.winograd import WinogradConv2D, transform_kernel, winograd_model


@pytest.mark.parametrize("size,channels,filters", [(8, 5, 7), (4, 16, 3), (2, 3, 4)])
def test_winograd_conv_equals_direct_conv(size, channels, filters):
    rng = np.random.default_rng(size)
    x = rng.normal(size=(2, size, size + 2, channels)).astype("float32")
    kernel = rng.normal(size=(3, 3, channels, filters)).astype("float32")
    bias = rng.normal(size=filters).astype("float32")
    conv = keras.layers.Conv2D(filters, 3, padding="same")
    conv.build(x.shape)
    conv.set_weights([kernel, bias])
    expected = np.asarray(conv(x))
    wino = WinogradConv2D(filters)
    wino.build(x.shape)
    wino.set_weights([transform_kernel(kernel), bias])
    got = np.asarray(wino(x))
    assert got.shape == expected.shape == (2, size, size + 2, filters)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_odd_feature_maps_are_refused():
    with pytest.raises(ValueError, match="even"):
        WinogradConv2D(4).build((1, 7, 8, 3))


def test_cifar_resnet18_rewrite_matches_and_leaves_the_source_alone():
    keras.utils.set_random_seed(0)
    model = random_batchnorm_statistics(build_resnet18(input_shape=(32, 32, 3), stem="cifar", classes=10))
    before = [w.copy() for w in model.get_weights()]
    new, names = winograd_model(model)
    # Stride-1 3x3 convs on 16x16, 8x8 and 4x4 maps; 32x32 (stage 1) stays direct.
    assert names == [f"stage{s}_{c}" for s in (2, 3, 4)
                     for c in ("block1_conv2", "block2_conv1", "block2_conv2")]
    kinds = {layer.name: type(layer).__name__ for layer in new.layers}
    assert all(kinds[n] == "WinogradConv2D" for n in names)
    assert kinds["stage2_block1_bn2"] == "Lambda"  # folded into the conv before it
    assert kinds["stage1_block1_conv1"] == "Conv2D"
    assert new.count_params() > model.count_params()  # 16 / 9 of each rewritten kernel
    x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(new(x)), np.asarray(model(x)), atol=1e-4)
    for old, now in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, now)
    # The source graph is unchanged (no layer shared with the copy) and can be rewritten again.
    assert all(len(spec["inbound_nodes"]) == 1 for spec in model.get_config()["layers"][1:])
    assert winograd_model(model)[1] == names


def test_nothing_eligible_returns_the_model_itself():
    inputs = keras.Input((9, 9, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)  # odd map
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(
        keras.layers.ZeroPadding2D(((0, 1), (0, 1)))(x))  # activation inside the conv
    model = keras.Model(inputs, keras.layers.Conv2D(4, 3, strides=2)(x))  # strided
    assert winograd_model(model) == (model, [])
