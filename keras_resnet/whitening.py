"""Patch-whitening start for the first convolution: a short-budget training trick.

The stem conv's filters start as the training images' patch-whitening directions
(eigenvectors of the covariance of k x k x C patches, each scaled by
1/sqrt(eigenvalue + eps)), in +/- pairs so that the ReLU after the BatchNorm keeps
both signs, and stay frozen. The first layer then sees decorrelated inputs from the
first step, which is what "How to train your ResNet" (Page, 2018) and airbench
(Jordan, 2024) use to cut the epochs a short run needs. Keras has no such
initializer (it depends on the data), hence this module. Only the kernel's values
change: the architecture and the weight layout stay the reference's.
"""

import numpy as np

STEM_CONV = "stem_conv1"  # the first conv of every stem (keras_resnet.model.resnet_stem)


def patch_whitening_kernel(images, mean, std, kernel_size, filters, eps=5e-4):
    """A (k, k, C, n) kernel of +/- whitening filters, n = 2 * min(filters // 2, k*k*C).

    ``images`` are (N, H, W, C) pixels on the 0..255 scale; ``mean`` / ``std`` the
    per-channel normalisation the model applies before the conv. Directions with the
    largest variance come first when there are fewer filter pairs than patch dims.
    """
    x = (np.asarray(images, np.float64) - np.asarray(mean)) / np.asarray(std)
    n, h, w, c = x.shape
    k = kernel_size
    if n < 1 or h < k or w < k:
        raise ValueError(f"patch whitening: need images of at least {k}x{k}; "
                         f"got shape {x.shape}")
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))
    # (N, H', W', C, k, k) -> rows of (k, k, C), the order of a Keras conv kernel.
    patches = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, k * k * c)
    eigenvalues, vectors = np.linalg.eigh(np.cov(patches, rowvar=False))
    order = np.argsort(eigenvalues)[::-1][:min(filters // 2, k * k * c)]
    directions = vectors[:, order] / np.sqrt(eigenvalues[order] + eps)
    kernel = np.concatenate([directions, -directions], axis=1)
    return kernel.reshape(k, k, c, -1).astype(np.float32)


def whiten_stem(model, images, mean, std, *, freeze=True, eps=5e-4):
    """Set the first filters of ``model``'s stem conv to patch-whitening filters
    (the rest keep their random start) and, with ``freeze``, stop training it.

    Returns the number of filters set.
    """
    conv = model.get_layer(STEM_CONV)
    kh, kw, cin, filters = conv.kernel.shape
    if kh != kw or cin != np.shape(images)[-1]:
        raise ValueError(f"patch whitening: {STEM_CONV} has a {kh}x{kw}x{cin} kernel; "
                         f"images have {np.shape(images)[-1]} channels")
    white = patch_whitening_kernel(images, mean, std, kh, filters, eps)
    kernel = np.array(conv.kernel.numpy(), np.float32)
    kernel[..., :white.shape[-1]] = white
    conv.kernel.assign(kernel)
    if freeze:
        conv.trainable = False
    return white.shape[-1]
