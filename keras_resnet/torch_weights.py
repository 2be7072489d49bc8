"""Load a PyTorch ResNet ``state_dict`` (torchvision or timm layout) into our models.

Only NumPy is needed: pass ``{key: tensor.numpy()}``. Three key layouts map one
to one onto our layer names:

- torchvision ``resnet*`` / ``resnext*`` / ``wide_resnet*`` (``conv1``, ``bn1``,
  ``layer1.0.conv1``, ``layer1.0.downsample.0``, ``fc``);
- timm ``resnet*d`` (the same, with the deep stem ``conv1.0`` / ``.1`` / ``.3`` /
  ``.4`` / ``.6`` and the ResNet-D shortcut ``downsample.1`` (conv) /
  ``downsample.2`` (BN) behind its average pool);
- timm ``resnetv2`` pre-activation models (``stem.conv``,
  ``stages.0.blocks.0.norm1``, ``.conv1``, ``.downsample.conv``, ``norm``,
  ``head.fc``).
"""

import re

import keras
import numpy as np

_V1_BLOCK = re.compile(r"layer(\d+)\.(\d+)\.(conv\d|bn\d|downsample\.[012])$")
_V2_BLOCK = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.(conv\d|norm\d|downsample\.conv)$")
# timm's deep stem: Sequential(conv, bn, relu, conv, bn, relu, conv), then bn1.
_DEEP_STEM = {"conv1.0": "stem_conv1", "conv1.1": "stem_bn1", "conv1.3": "stem_conv2",
              "conv1.4": "stem_bn2", "conv1.6": "stem_conv3", "bn1": "stem_bn3"}
_V2_TOP = {"stem.conv": "stem_conv1", "norm": "post_bn", "head.fc": "predictions"}


def torch_to_keras_name(module, *, deep_stem=False, avg_down=False):
    """Map a PyTorch module path (``layer2.0.downsample.0``) to our layer name.

    Args:
        deep_stem: the state dict has timm's deep stem (``conv1.0`` ...).
        avg_down: its shortcuts are ResNet-D (``downsample.0`` is the pool).
    """
    if deep_stem and module in _DEEP_STEM:
        return _DEEP_STEM[module]
    if module in ("conv1", "bn1"):
        return f"stem_{module}"
    if module == "fc":
        return "predictions"
    if module in _V2_TOP:
        return _V2_TOP[module]
    stem = re.fullmatch(r"stem\.(conv|norm)(\d)", module)
    if stem:
        return f"stem_{'bn' if stem[1] == 'norm' else 'conv'}{stem[2]}"
    match = _V1_BLOCK.match(module)
    if match:
        stage_index, block, part = match.groups()
        downsample = ({"downsample.1": "down_conv", "downsample.2": "down_bn"} if avg_down
                      else {"downsample.0": "down_conv", "downsample.1": "down_bn"})
        part = downsample.get(part, part)
        return f"stage{stage_index}_block{int(block) + 1}_{part}"
    match = _V2_BLOCK.match(module)
    if match:
        stage_index, block, part = match.groups()
        part = part.replace("norm", "bn").replace("downsample.conv", "down_conv")
        return f"stage{int(stage_index) + 1}_block{int(block) + 1}_{part}"
    raise ValueError(f"state_dict: unknown ResNet module {module!r}")


def load_torch_state_dict(model, state_dict):
    """Copy PyTorch ResNet weights (NumPy arrays) into ``model``.

    A model without a classifier (``include_top=False``) ignores the
    checkpoint's head (``fc`` / ``head.fc``).

    Raises:
        ValueError: a key has no layer in ``model``, a shape does not fit, or a
            layer of ``model`` with weights got none.
    """
    deep_stem = "conv1.0.weight" in state_dict
    avg_down = any(re.search(r"\.downsample\.2\.", k) for k in state_dict)
    grouped = {}
    for key, value in state_dict.items():
        module, _, param = key.rpartition(".")
        if param == "num_batches_tracked":
            continue
        name = torch_to_keras_name(module, deep_stem=deep_stem, avg_down=avg_down)
        grouped.setdefault(name, {})[param] = np.asarray(value)
    if not any(layer.name == "predictions" for layer in model.layers):
        grouped.pop("predictions", None)
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in grouped:
            raise ValueError(f"state_dict: no weights for layer {layer.name!r}")
        p = grouped.pop(layer.name)
        weight = p["weight"]
        if "running_mean" in p:
            values = [weight, p["bias"], p["running_mean"], p["running_var"]]
        elif layer.__class__.__name__ == "Dense":
            if weight.ndim == 4:  # timm resnetv2's head is a 1x1 conv
                weight = weight[:, :, 0, 0]
            values = [weight.T, p["bias"]]  # (out, in) -> (in, out)
        else:  # (out, in, kh, kw) -> (kh, kw, in, out)
            values = [weight.transpose(2, 3, 1, 0)] + ([p["bias"]] if "bias" in p else [])
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise ValueError(f"state_dict: shapes {[v.shape for v in values]} do not "
                             f"fit layer {layer.name!r} {expected}")
        layer.set_weights(values)
    if grouped:
        raise ValueError(f"state_dict: no layer for {sorted(grouped)[:5]}")


def keras_to_torch_name(layer, *, deep_stem=False, avg_down=False, preact=False):
    """The inverse of :func:`torch_to_keras_name`: our layer name -> PyTorch module path.

    The layout follows the model: torchvision for plain ResNets, timm's
    ``resnet*d`` for a deep stem / average-pool shortcut, timm's ``resnetv2``
    for pre-activation models.
    """
    if preact:
        top = {v: k for k, v in _V2_TOP.items()}
        if layer in top:
            return top[layer]
        stem = re.fullmatch(r"stem_(conv|bn)(\d)", layer)
        if stem:
            return f"stem.{'norm' if stem[1] == 'bn' else 'conv'}{stem[2]}"
    elif deep_stem and layer in _DEEP_STEM.values():
        return next(k for k, v in _DEEP_STEM.items() if v == layer)
    elif layer in ("stem_conv1", "stem_bn1"):
        return layer[len("stem_"):]
    elif layer == "predictions":
        return "fc"
    match = re.fullmatch(r"stage(\d)_block(\d+)_(conv\d|bn\d|down_conv|down_bn)", layer)
    if not match:
        raise ValueError(f"layer {layer!r} has no PyTorch counterpart")
    stage_index, block, part = int(match[1]), int(match[2]) - 1, match[3]
    if preact:
        part = part.replace("bn", "norm").replace("down_conv", "downsample.conv")
        return f"stages.{stage_index - 1}.blocks.{block}.{part}"
    offset = 1 if avg_down else 0  # ResNet-D: downsample.0 is the pool
    part = {"down_conv": f"downsample.{offset}", "down_bn": f"downsample.{offset + 1}"}.get(
        part, part)
    return f"layer{stage_index}.{block}.{part}"


def torch_state_dict(model):
    """``model``'s weights as a PyTorch ``state_dict`` of NumPy arrays (the reference
    key names and layouts, ``num_batches_tracked`` included, so that
    ``load_state_dict(strict=True)`` accepts it)."""
    names = {layer.name for layer in model.layers}
    layout = {"deep_stem": "stem_conv3" in names, "preact": "post_bn" in names,
              "avg_down": any(n.endswith("_down_pool") for n in names)}
    state = {}
    for layer in model.layers:
        if not layer.weights:
            continue
        module = keras_to_torch_name(layer.name, **layout)
        values = [np.asarray(w) for w in layer.get_weights()]
        kind = type(layer).__name__
        if isinstance(layer, keras.layers.BatchNormalization):
            for param, v in zip(("weight", "bias", "running_mean", "running_var"), values,
                                strict=True):
                state[f"{module}.{param}"] = v
            state[f"{module}.num_batches_tracked"] = np.zeros((), np.int64)
            continue
        if kind == "Dense":
            weight = values[0].T  # (in, out) -> (out, in)
            if layout["preact"]:  # timm resnetv2's head is a 1x1 conv
                weight = weight[:, :, None, None]
        else:  # (kh, kw, in, out) -> (out, in, kh, kw)
            weight = values[0].transpose(3, 2, 0, 1)
        state[f"{module}.weight"] = weight
        if len(values) > 1:
            state[f"{module}.bias"] = values[1]
    return {k: np.ascontiguousarray(v) for k, v in state.items()}
