"""Evaluation of a trained classifier and the plots of a run.

``evaluate`` scores a model on an eval dataset (top-1, top-5, per-class
accuracy, confusion matrix); ``plot_history`` and ``plot_confusion`` draw the
PNGs a training run leaves in its directory.
"""

import numpy as np


def predict_probabilities(model, data, tta_flip=False, tta_shift=0, batch_size=128):
    """Softmax probabilities and integer labels over ``data``: a tf.data dataset of
    (images, one-hot labels), or (uint8 images, int labels) arrays (the memory
    pipeline); ``tta_flip`` / ``tta_shift`` average the logits over the test-time
    views (``predict.tta_views``)."""
    from keras_resnet.predict import tta_views

    views, labels = view_logits(model, data, tta_views(tta_flip, tta_shift), batch_size)
    return softmax(np.mean(views, axis=0)), labels


def view_logits(model, data, views, batch_size=128):
    """The model's float32 outputs over ``data``, one (N, C) array per view
    (``predict.tta_views`` pairs), and the integer labels. All views of an image go
    through the network in one batch of ``batch_size`` images (``predict.view_model``);
    the mean of these logits is what ``predict.tta_model`` computes."""
    from keras_resnet.predict import view_model
    from keras_resnet.sources import unknown_length_ok

    per_batch = max(1, batch_size // len(views))
    net = model if len(views) == 1 else view_model(model, views)
    if isinstance(data, tuple):  # arrays: no TensorFlow needed
        from keras_resnet.arrays import BatchFeed

        images, labels = data
        logits = net.predict(BatchFeed(images, None, per_batch, 0), verbose=0)
    else:
        # One pass: each batch's labels are kept as the batch goes into the network,
        # so they stay paired with its logits even if the dataset reshuffles, and no
        # image is decoded twice. A generator (not a predict_on_batch loop) keeps
        # predict's handling of a tf.distribute model.
        if len(views) > 1:
            data = data.unbatch().batch(per_batch)
        labels = []

        def images_only():
            for images, onehot in data.as_numpy_iterator():
                labels.append(np.argmax(onehot, axis=1))
                yield (images,)

        with unknown_length_ok():
            logits = net.predict(images_only(), verbose=0)
        labels = np.concatenate(labels)
    logits = np.asarray(logits, np.float32).reshape(len(labels), len(views), -1)
    return [logits[:, i] for i in range(len(views))], np.asarray(labels)


def softmax(logits):
    """Row-wise softmax of NumPy logits, in NumPy: under JAX ``keras.ops.softmax`` on
    an array compiles a program for each new shape (~0.2 s each on a CPU)."""
    z = np.asarray(logits, np.float32)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def evaluate(model, data, class_names, tta_flip=False, tta_shift=0, batch_size=128):
    """top1, top5, per-class accuracy and the confusion matrix on ``data``; with
    test-time augmentation (``tta_flip``, ``tta_shift``: ``predict.tta_views``) the
    figures of fewer views beside them."""
    from keras_resnet.predict import tta_views

    views, labels = view_logits(model, data, tta_views(tta_flip, tta_shift), batch_size)
    probs = softmax(np.mean(views, axis=0))
    top5 = np.argsort(-probs, axis=1)[:, :5]
    pred = top5[:, 0]
    n = len(class_names)
    confusion = np.zeros((n, n), np.int64)
    np.add.at(confusion, (labels, pred), 1)
    per_class = {name: round(float(confusion[i, i] / max(confusion[i].sum(), 1)), 4)
                 for i, name in enumerate(class_names)}
    report = {"top1": round(float(np.mean(pred == labels)), 4),
              "top5": round(float(np.mean(np.any(top5 == labels[:, None], axis=1))), 4),
              "per_class": per_class, "num_images": len(labels), "tta_flip": bool(tta_flip),
              "tta_shift": int(tta_shift), "confusion_matrix": confusion.tolist()}

    def top1_of(first_views):  # the unshifted views come first (tta_views)
        pred = np.argmax(np.mean(views[:first_views], axis=0), axis=1)
        return round(float(np.mean(pred == labels)), 4)

    if len(views) > 1:
        report["top1_single_view"] = top1_of(1)
    if tta_flip and tta_shift:
        report["top1_flip_only"] = top1_of(2)
    return report


def plot_history(history, path):
    """Loss and accuracy curves (train and validation) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [e + 1 for e in history.get("epoch", [])]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        for prefix, style in (("", "-"), ("val_", "--")):
            if prefix + key in history:
                ax.plot(epochs, history[prefix + key], style, marker="o",
                        label=(prefix or "train_") + key)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(confusion, class_names, path):
    """Confusion matrix (rows: true class, columns: predicted) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(confusion, cmap="Blues")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in ticks:
        for j in ticks:
            ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7)
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
