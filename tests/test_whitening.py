"""Patch-whitening start of the stem conv (``--whiten-stem``)."""

import numpy as np
import pytest

from keras_resnet import whitening
from keras_resnet.model import build_classifier

MEAN, STD = (120.0, 110.0, 100.0), (60.0, 55.0, 50.0)


def smooth_images(n=48, size=16, seed=0):
    """Images whose neighbouring pixels and channels correlate, as in photographs."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, size + 2, size + 2, 3))
    x = x + np.roll(x, 1, axis=1) + np.roll(x, 1, axis=2) + x[..., :1]
    return np.clip(110 + 40 * x[:, 1:-1, 1:-1], 0, 255)


def patches(images, k=3):
    x = (images - np.asarray(MEAN)) / np.asarray(STD)
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))
    return windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, k * k * 3)


def test_filters_decorrelate_patches_in_plus_minus_pairs():
    images = smooth_images()
    kernel = whitening.patch_whitening_kernel(images, MEAN, STD, 3, 64, eps=1e-6)
    assert kernel.shape == (3, 3, 3, 54) and kernel.dtype == np.float32
    np.testing.assert_array_equal(kernel[..., 27:], -kernel[..., :27])
    p = patches(images)
    assert np.abs(np.corrcoef(p, rowvar=False) - np.eye(27)).max() > 0.3  # correlated in
    responses = p @ kernel.reshape(27, -1)[:, :27]
    np.testing.assert_allclose(np.cov(responses, rowvar=False), np.eye(27), atol=1e-3)


def test_fewer_filter_pairs_than_patch_dims_keep_the_largest_variances():
    images = smooth_images()
    kernel = whitening.patch_whitening_kernel(images, MEAN, STD, 3, 8, eps=1e-6)
    assert kernel.shape == (3, 3, 3, 8)
    eigenvalues = np.linalg.eigvalsh(np.cov(patches(images), rowvar=False))
    # filter i = v_i / sqrt(lambda_i): its squared norm is 1 / lambda_i
    norms = np.sum(kernel.reshape(27, -1)[:, :4] ** 2, axis=0)
    np.testing.assert_allclose(1 / norms, eigenvalues[::-1][:4], rtol=1e-4)


def test_whiten_stem_sets_and_freezes_the_stem_conv_only():
    model = build_classifier(image_size=(16, 16), num_classes=3, mean=MEAN, std=STD,
                             stem="cifar")
    conv = model.get_layer(whitening.STEM_CONV)
    before = conv.kernel.numpy().copy()
    trainable = len(model.trainable_weights)
    assert whitening.whiten_stem(model, smooth_images(), MEAN, STD) == 54
    after = conv.kernel.numpy()
    np.testing.assert_allclose(after[..., :54], whitening.patch_whitening_kernel(
        smooth_images(), MEAN, STD, 3, 64), rtol=1e-6)
    np.testing.assert_array_equal(after[..., 54:], before[..., 54:])  # random start kept
    assert not conv.trainable and len(model.trainable_weights) == trainable - 1


def test_images_smaller_than_the_kernel_are_refused():
    with pytest.raises(ValueError, match="at least 3x3"):
        whitening.patch_whitening_kernel(np.zeros((2, 2, 2, 3)), MEAN, STD, 3, 64)
