"""Every named variant against its PyTorch reference, with transferred weights."""

import numpy as np
import pytest

import keras_resnet as kr
from keras_resnet.torch_weights import load_torch_state_dict, torch_to_keras_name

torch = pytest.importorskip("torch")  # the dev extra installs it; only this module needs it


def reference_logits(options, stem, size, seed):
    from keras_resnet.torch_reference import build_reference, randomize_bn_statistics

    torch.manual_seed(seed)
    ref = randomize_bn_statistics(build_reference(options, 10, stem), seed).eval()
    x = np.random.default_rng(seed).normal(size=(2, size, size, 3)).astype("float32")
    with torch.no_grad():
        logits = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    return {k: v.numpy() for k, v in ref.state_dict().items()}, x, logits


CASES = [(name, kr.MODELS[name].get("stem", "imagenet"), 64) for name in kr.MODELS]
CASES += [("resnet18", "cifar", 32), ("preact_resnet18", "cifar", 32),
          ("resnet34", "imagenet", 37)]  # odd size: padding of strided convs and pools


@pytest.mark.parametrize("name, stem, size", CASES)
def test_reference_weights_give_reference_logits(name, stem, size):
    """Eval-mode logits equal the reference's after loading its state_dict."""
    state, x, expected = reference_logits(kr.MODELS[name], stem, size, seed=size)
    model = kr.build_model(name, input_shape=(size, size, 3), classes=10, stem=stem,
                           classifier_activation=None)
    load_torch_state_dict(model, state)
    got = np.asarray(model(x, training=False))
    assert np.std(expected) > 0.03  # not a comparison of near-constant outputs
    np.testing.assert_allclose(got, expected, atol=2e-5 * max(1, np.abs(expected).max()))


def test_preact_differs_from_the_old_activated_shortcut():
    """The v2 reference disagrees with a model whose identity path is pre-activated:
    the test above would catch the old defect."""
    state, x, _ = reference_logits(kr.MODELS["preact_resnet18"], "cifar", 32, 1)
    model = kr.build_model("preact_resnet18", input_shape=(32, 32, 3), classes=10,
                           stem="cifar", classifier_activation=None)
    load_torch_state_dict(model, state)
    import keras

    # Rewire one block the old way: identity = ReLU(BN(x)).
    block_in = model.get_layer("stage1_block2_bn1").input
    pre = model.get_layer("stage1_block2_relu1").output
    assert model.get_layer("stage1_block2_add").input[0] is block_in
    old_add = keras.layers.Add()([pre, model.get_layer("stage1_block2_conv2").output])
    probe = keras.Model(model.input, [model.get_layer("stage1_block2_add").output, old_add])
    new, old = (np.asarray(t) for t in probe(x, training=False))
    assert np.abs(new - old).max() > 0.1


@pytest.mark.parametrize("module, kwargs, expected", [
    ("layer2.0.downsample.0", {}, "stage2_block1_down_conv"),
    ("layer2.0.downsample.1", {"avg_down": True}, "stage2_block1_down_conv"),
    ("layer2.0.downsample.2", {"avg_down": True}, "stage2_block1_down_bn"),
    ("conv1.6", {"deep_stem": True}, "stem_conv3"),
    ("bn1", {"deep_stem": True}, "stem_bn3"),
    ("bn1", {}, "stem_bn1"),
    ("stages.3.blocks.1.norm2", {}, "stage4_block2_bn2"),
    ("stages.1.blocks.0.downsample.conv", {}, "stage2_block1_down_conv"),
    ("head.fc", {}, "predictions"),
])
def test_key_mapping(module, kwargs, expected):
    assert torch_to_keras_name(module, **kwargs) == expected


def test_mismatched_state_dict_is_refused():
    state, _, _ = reference_logits(kr.MODELS["resnet18"], "cifar", 32, 0)
    model = kr.build_model("resnet34", input_shape=(32, 32, 3), classes=10, stem="cifar")
    with pytest.raises(ValueError, match="state_dict: no weights for layer 'stage1_block3"):
        load_torch_state_dict(model, state)
    with pytest.raises(ValueError, match="unknown ResNet module 'layer9.x'"):
        torch_to_keras_name("layer9.x")


@pytest.mark.parametrize("name, last_bn", [("resnet10t", "bn2"), ("resnet50", "bn3")])
def test_benchmark_torch_side_is_the_named_network_with_zero_init_residual(name, last_bn):
    """scripts/benchmark_training.py --model: PyTorch trains as many parameters as the
    Keras side, and each block's last BN gamma starts at 0 as the recipe's does."""
    from keras_resnet.torch_reference import BasicBlock, Bottleneck
    from keras_resnet.torch_training import TorchRecipe

    recipe = TorchRecipe(num_classes=10, mean=(0, 0, 0), std=(1, 1, 1), batch_size=2,
                         total_steps=1, model=name)
    model = kr.build_model(name, stem="cifar", input_shape=(32, 32, 3), classes=10)
    assert sum(p.numel() for p in recipe.model.parameters()) == sum(
        int(np.prod(w.shape)) for w in model.trainable_weights)
    blocks = [m for m in recipe.model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert len(blocks) == sum(kr.model.RESNET_SPECS[kr.MODELS[name]["depth"]][1])
    for block in blocks:
        assert not getattr(block, last_bn).weight.any()
        assert block.bn1.weight.all()
