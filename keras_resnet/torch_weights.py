"""Load a torchvision ResNet ``state_dict`` into a model of this package.

Only NumPy is needed: pass ``{key: tensor.numpy()}``. The key layout is
torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``,
``fc``); our layer names are derived from it one to one.
"""

import re

import numpy as np

_BLOCK_KEY = re.compile(r"layer(\d+)\.(\d+)\.(conv\d|bn\d|downsample\.[01])$")


def torch_to_keras_name(module):
    """Map a torchvision module path (``layer2.0.downsample.0``) to a layer name."""
    if module in ("conv1", "bn1"):
        return f"stem_{module}"
    if module == "fc":
        return "predictions"
    match = _BLOCK_KEY.match(module)
    if not match:
        raise ValueError(f"state_dict: unknown torchvision module {module!r}")
    stage_index, block, part = match.groups()
    part = {"downsample.0": "down_conv", "downsample.1": "down_bn"}.get(part, part)
    return f"stage{stage_index}_block{int(block) + 1}_{part}"


def load_torch_state_dict(model, state_dict):
    """Copy torchvision ResNet weights (NumPy arrays) into ``model``.

    Raises:
        ValueError: a key has no layer in ``model``, a shape does not fit, or a
            layer of ``model`` with weights got none.
    """
    grouped = {}
    for key, value in state_dict.items():
        module, _, param = key.rpartition(".")
        if param == "num_batches_tracked":
            continue
        grouped.setdefault(torch_to_keras_name(module), {})[param] = np.asarray(value)
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in grouped:
            raise ValueError(f"state_dict: no weights for layer {layer.name!r}")
        p = grouped.pop(layer.name)
        if "running_mean" in p:
            values = [p["weight"], p["bias"], p["running_mean"], p["running_var"]]
        elif p["weight"].ndim == 4:  # (out, in, kh, kw) -> (kh, kw, in, out)
            values = [p["weight"].transpose(2, 3, 1, 0)]
        else:  # Linear: (out, in) -> (in, out)
            values = [p["weight"].T, p["bias"]]
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise ValueError(f"state_dict: shapes {[v.shape for v in values]} do not "
                             f"fit layer {layer.name!r} {expected}")
        layer.set_weights(values)
    if grouped:
        raise ValueError(f"state_dict: no layer for {sorted(grouped)[:5]}")
