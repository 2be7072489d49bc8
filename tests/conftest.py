import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def random_batchnorm_statistics(model, seed=0):
    """Give every BatchNorm non-trivial statistics, gamma and beta, so that an
    exported or rewritten graph has something to get wrong. (Gammas are
    non-zero: zero-init residual gammas fold into all-zero kernels, which the
    TFLite converter stores only once.)"""
    import keras
    import numpy as np

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.1, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.1, n).astype("float32"))
    return model
