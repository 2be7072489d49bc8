"""Winograd F(2x2, 3x3) rewrite of 3x3 convolutions for the float32 TFLite export.

XNNPACK, LiteRT's CPU backend, runs every convolution as a direct (implicit
GEMM) convolution, and the CIFAR ResNet18 float32 .tflite spends 95 % of its
time in that one kernel, at close to the FLOP rate of a large sgemm. Winograd's
minimal filtering computes a 3x3 convolution with 4 instead of 9
multiplications per output pixel and channel pair; neither TFLite, the
converter nor Keras offers it, so :func:`winograd_model` builds it from ops
every runtime has (a depthwise conv, transposes, one batched matmul, one small
matmul) and the float32 TFLite export uses it. Outputs equal the direct
convolution to float32 rounding; every export is checked against Keras anyway.

Only stride-1 "same" 3x3 convs on even feature maps of at most
``MAX_PIXELS`` pixels are rewritten: on larger maps the transforms move more
memory than the saved multiplications are worth (measured on LiteRT 2.3,
2 threads: 32x32x64 was 1.05x slower, 16x16x128 1.3x and 8x8x256 1.6x faster).
"""

import keras
import numpy as np
from keras import layers, ops

MAX_PIXELS = 16 * 16
# Lavin & Gray 2016, F(2, 3): y = A^T [(G g G^T) * (B^T d B)] A per 4x4 input tile.
B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)


def transform_kernel(kernel):
    """(3, 3, C, K) kernel -> (16, C, K) Winograd-domain kernel ``G g G^T``."""
    u = np.einsum("ai,ijck,bj->abck", G, np.asarray(kernel, np.float32), G)
    return u.reshape(16, *u.shape[2:])


class WinogradConv2D(layers.Layer):
    """A 3x3, stride-1, "same" convolution (+ bias) computed by Winograd F(2x2, 3x3).

    Input tiles of 4x4 (stride 2) are transformed by a fixed depthwise conv
    (16 outputs per channel), multiplied with the transformed kernel as 16
    independent (pixels x C) @ (C x K) matmuls, and transformed back to 2x2
    output tiles. Height and width must be even.
    """

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters

    def build(self, input_shape):
        h, w, c = input_shape[1:]
        if h % 2 or w % 2:
            raise ValueError(f"{self.name}: height and width must be even, got {h}x{w}")
        self.kernel = self.add_weight((16, c, self.filters), name="kernel")
        self.bias = self.add_weight((self.filters,), name="bias", initializer="zeros")
        # Depthwise kernel (4, 4, C, 16): output xi = (a, b) of a tile is
        # sum_ij B^T[a, i] B^T[b, j] d[i, j], the same for every channel.
        tile = np.einsum("ai,bj->ijab", B_T, B_T).reshape(4, 4, 1, 16)
        self.input_transform = np.tile(tile, (1, 1, c, 1))
        # (4, 16): output pixel (p, q) of a tile from the 16 products.
        self.output_transform = np.einsum("pa,qb->pqab", A_T, A_T).reshape(4, 16)

    def call(self, x):
        n = ops.shape(x)[0]  # a tensor when the batch size is unknown
        h, w, c = x.shape[1:]
        k = self.filters
        tiles = n * (h // 2) * (w // 2)
        x = ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
        v = ops.depthwise_conv(x, self.input_transform, strides=2, padding="valid")
        v = ops.transpose(ops.reshape(v, (tiles, c, 16)), (2, 0, 1))     # (16, tiles, C)
        m = ops.matmul(v, self.kernel)                                   # (16, tiles, K)
        y = ops.matmul(self.output_transform, ops.reshape(m, (16, tiles * k)))  # (4, ...)
        y = ops.reshape(y, (2, 2, n * (h // 2), w // 2, k))             # (p, q, N*H/2, W/2, K)
        y = ops.reshape(ops.transpose(y, (2, 0, 3, 1, 4)), (n, h, w, k))
        return y + self.bias

    def compute_output_shape(self, input_shape):
        return (*input_shape[:3], self.filters)


def _eligible(conv):
    if not isinstance(conv, layers.Conv2D):
        return False
    shape = conv.input.shape
    return (conv.kernel_size == (3, 3) and conv.strides == (1, 1)
            and conv.dilation_rate == (1, 1) and conv.groups == 1
            and conv.padding == "same" and conv.data_format == "channels_last"
            and conv.activation is keras.activations.linear
            and shape[1] is not None and shape[2] is not None
            and shape[1] % 2 == 0 and shape[2] % 2 == 0
            and shape[1] * shape[2] <= MAX_PIXELS)


def _folded(conv, bn):
    """Kernel and bias of ``conv`` with the inference BatchNorm ``bn`` after it folded in."""
    kernel = np.asarray(conv.kernel, np.float32)
    bias = np.asarray(conv.bias, np.float32) if conv.use_bias else np.zeros(
        kernel.shape[-1], np.float32)
    if bn is not None:
        gamma = np.asarray(bn.gamma, np.float32) if bn.scale else 1.0
        beta = np.asarray(bn.beta, np.float32) if bn.center else 0.0
        scale = gamma / np.sqrt(np.asarray(bn.moving_variance, np.float32) + bn.epsilon)
        kernel = kernel * scale
        bias = (bias - np.asarray(bn.moving_mean, np.float32)) * scale + beta
    return transform_kernel(kernel), bias


def _graph_edges(model):
    """How often each layer is called, and which layers consume its output.

    Read from the model's config, Keras's public description of a functional
    graph (its node objects are private): every argument tensor of a call names
    the layer that produced it in ``keras_history``.
    """
    calls, consumers = {}, {}

    def producers(value):
        if isinstance(value, dict):
            if "keras_history" in value:
                yield value["keras_history"][0]
            for v in value.values():
                yield from producers(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from producers(v)

    for spec in model.get_config()["layers"]:
        calls[spec["name"]] = len(spec["inbound_nodes"])
        for source in set(producers(spec["inbound_nodes"])):
            consumers.setdefault(source, []).append(spec["name"])
    return calls, consumers


def winograd_model(model):
    """A copy of ``model`` with each eligible 3x3 conv (and its BatchNorm) as Winograd.

    Returns ``(new_model, names)``: ``names`` lists the rewritten convs (empty:
    ``model`` itself is returned). A BatchNorm that is the only consumer of an
    eligible conv is folded into its kernel and bias (inference statistics)
    and becomes a pass-through. Every other layer is a fresh copy holding the
    same weights, so ``model`` is left untouched.
    """
    folded = {}  # conv name -> (transformed kernel, bias)
    absorbed = set()  # names of the BatchNorms folded into the conv before them
    calls, consumers = _graph_edges(model)
    for layer in model.layers:
        if calls[layer.name] != 1 or not _eligible(layer):
            continue
        after = consumers.get(layer.name, [])
        bn = model.get_layer(after[0]) if len(after) == 1 else None
        if not (isinstance(bn, layers.BatchNormalization) and bn.axis in (-1, 3)
                and calls[bn.name] == 1):
            bn = None
        folded[layer.name] = _folded(layer, bn)
        if bn is not None:
            absorbed.add(bn.name)
    if not folded:
        return model, []

    def clone(layer):
        if layer.name in folded:
            return WinogradConv2D(layer.filters, name=layer.name, dtype="float32")
        if layer.name in absorbed:
            # A Lambda, not Identity: the node replays BatchNorm's mask / training kwargs.
            return layers.Lambda(lambda x: x, name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    new = keras.models.clone_model(model, clone_function=clone)
    for layer in new.layers:
        if layer.name in folded:
            layer.set_weights(list(folded[layer.name]))
        elif layer.name not in absorbed:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    return new, list(folded)
