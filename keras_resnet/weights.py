"""Pretrained weights: files in and out, the published ImageNet checkpoints, and the
preprocessing each set of weights expects.

``load_weights(model, weights)`` takes ``"imagenet"``, a PyTorch checkpoint
(``.pth`` / ``.pt`` / ``.bin``, or ``.safetensors``; torchvision or timm key
names) or a Keras ``.weights.h5`` / ``.keras`` file. ``save_torch_weights``
writes the way back: a ``.safetensors`` file with the reference key names.
NumPy, h5py (through Keras) and ``safetensors`` do the reading: torch is not
needed at run time.
"""

import collections
import os
import pickle
import warnings
import zipfile

import keras
import numpy as np

from keras_resnet import atomic
from keras_resnet.torch_weights import load_torch_state_dict, torch_state_dict

# The input each set of weights was trained on: 0..255 scale mean / std, the
# input size, and the eval crop ratio (resize the shorter side to size / ratio,
# then centre-crop). One place for it: fine-tuning and export read it here.
PREPROCESSING = {
    # torchvision's ImageNet transforms (mean 0.485, 0.456, 0.406; std 0.229,
    # 0.224, 0.225; resize 256, crop 224).
    "imagenet": {"mean": (123.675, 116.28, 103.53), "std": (58.395, 57.12, 57.375),
                 "image_size": 224, "crop_ratio": 0.875},
}

# torchvision's IMAGENET1K_V1 checkpoints: MODELS name -> (url, sha256). The
# file names carry the first 8 hex digits of the hash; the full digests are
# pinned here so that get_file verifies every byte.
PUBLISHED = {
    "resnet18": ("https://download.pytorch.org/models/resnet18-f37072fd.pth",
                 "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec"),
    "resnet34": ("https://download.pytorch.org/models/resnet34-b627a593.pth",
                 "b627a593bcbe140c234610266fe4f8ae95ea42fc881d091c9b6052e6b1d0590f"),
    "resnet50": ("https://download.pytorch.org/models/resnet50-0676ba61.pth",
                 "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a"),
    "resnet101": ("https://download.pytorch.org/models/resnet101-63fe2227.pth",
                  "63fe2227b86e8f1f2063f43a75c84d195911b6a0eace650907dd3dc62dd49a0a"),
    "resnet152": ("https://download.pytorch.org/models/resnet152-394f9c45.pth",
                  "394f9c45966e3651a89bbb78a48410a6755854ce4a5ab64927cf1c7247f85e58"),
}
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
KERAS_SUFFIXES = (".weights.h5", ".keras")
CACHE_SUBDIR = "models"  # under KERAS_HOME (~/.keras), where get_file caches


def preprocessing_for(weights):
    """The preprocessing ``weights`` expect, or None when the weights carry none.

    ``"imagenet"`` and PyTorch checkpoints (torchvision / timm publish ImageNet
    weights) expect ImageNet's; a Keras file says nothing about its input.
    """
    if weights == "imagenet" or str(weights).endswith((*TORCH_SUFFIXES, ".safetensors")):
        return dict(PREPROCESSING["imagenet"])
    return None


# ------------------------------------------------------------------------ reading


def read_checkpoint(path):
    """A PyTorch checkpoint file -> ``{key: numpy array}``.

    ``.safetensors`` is read with the safetensors package's NumPy API. For
    ``.pth`` / ``.pt`` / ``.bin`` (torch.save's zip format) a restricted
    unpickler rebuilds the tensors as arrays: torch.load would need torch,
    and a plain unpickler runs whatever the file names. Training checkpoints
    that wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``) and
    DDP's ``module.`` prefix are unwrapped.

    Raises:
        ValueError: the file is missing or is not a checkpoint of tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"weights: file not found: {path!r}")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            state = load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"weights: {path!r} is not a readable .safetensors file "
                             f"({e})") from None
    else:
        state = _read_torch_zip(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not state or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise ValueError(f"weights: {path!r} holds no state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


_STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64,
                   "HalfStorage": np.float16, "LongStorage": np.int64,
                   "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
                   "ByteStorage": np.uint8, "BoolStorage": np.bool_}


def _read_torch_zip(path):
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"weights: {path!r} is not a PyTorch checkpoint in torch.save's "
                         f"zip format ({e}); re-save it with torch >= 1.6 or convert it to "
                         ".safetensors") from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if not pickles:
            raise ValueError(f"weights: {path!r} is a zip file but not a PyTorch checkpoint "
                             "(no data.pkl)")
        prefix = pickles[0][:-len("data.pkl")]

        def rebuild(storage, offset, size, stride, *_):
            itemsize = storage.dtype.itemsize
            return np.lib.stride_tricks.as_strided(
                storage[offset:], tuple(size), [s * itemsize for s in stride]).copy()

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                if (module, name) == ("collections", "OrderedDict"):
                    return collections.OrderedDict
                if module == "torch._utils" and name == "_rebuild_tensor_v2":
                    return rebuild
                if module == "torch._utils" and name == "_rebuild_parameter":
                    return lambda data, *_: data
                if module == "torch" and name in _STORAGE_DTYPES:
                    return np.dtype(_STORAGE_DTYPES[name])
                raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weights "
                                             "file")

            def persistent_load(self, pid):
                _, dtype, key, _location, _numel = pid
                return np.frombuffer(archive.read(f"{prefix}data/{key}"), dtype)

        try:
            with archive.open(pickles[0]) as f:
                state = Unpickler(f).load()
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError,
                zipfile.BadZipFile) as e:
            raise ValueError(f"weights: {path!r} is not a checkpoint of tensors ({e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"weights: {path!r} holds a {type(state).__name__}, not a "  # noqa: TRY004
                         "state_dict")
    return state


# ------------------------------------------------------------------------ loading


def load_weights(model, weights, *, arch=None):
    """Load ``weights`` ("imagenet" or a file path) into ``model``.

    ``arch`` names the published checkpoint for "imagenet" (a name of
    ``PUBLISHED``; default: ``model.name``, which the builders set to it).

    Raises:
        ValueError: the file is missing, unreadable, or does not fit ``model``
            (the message names the first layer that does not fit).
    """
    if weights == "imagenet":
        return _load_imagenet(model, arch or model.name)
    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise ValueError(f"weights: file not found: {path!r} (pass None, 'imagenet' or the "
                         "path of a .pth, .safetensors, .weights.h5 or .keras file)")
    if path.endswith((*TORCH_SUFFIXES, ".safetensors")):
        state = read_checkpoint(path)  # its errors name the file already
        try:
            load_torch_state_dict(model, state)
        except ValueError as e:
            raise ValueError(f"weights: {path!r} does not fit {model.name!r}: {e}") from None
        return
    if not path.endswith(KERAS_SUFFIXES):
        raise ValueError(f"weights: {path!r} must end in .pth, .pt, .bin, .safetensors, "
                         ".weights.h5 or .keras")
    def unfit(reason):
        return ValueError(f"weights: {path!r} does not fit the architecture of "
                          f"{model.name!r}: {reason}")

    # Keras warns that layers it could not match "will retain their freshly-initialized
    # weights", then raises (its error names the layer: that one is kept) or goes on
    # loading: either way the file does not fit, said once.
    fresh_words = "freshly-initialized"
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", f"(?s).*{fresh_words}", UserWarning)
        try:
            model.load_weights(path)
        except (ValueError, OSError, KeyError, TypeError) as e:  # Keras raises several types.
            raise unfit(e) from None
    fresh = [w for w in caught if fresh_words in str(w.message)]
    if fresh:
        raise unfit(fresh[0].message)
    for w in caught:  # the others, as they came
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def copy_weights(source, target, *, skip=("predictions",)):
    """Copy weights layer by layer (matched by name) from ``source`` into ``target``.

    Every layer of ``target`` with weights, except those in ``skip``, must
    exist in ``source`` with the same shapes.

    Raises:
        ValueError: naming the first layer that is missing or does not fit.
    """
    for layer in target.layers:
        if not layer.weights or layer.name in skip:
            continue
        try:
            values = source.get_layer(layer.name).get_weights()
        except ValueError:
            raise ValueError(f"weights: {source.name!r} has no layer {layer.name!r}") from None
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise ValueError(f"weights: layer {layer.name!r} has shapes "
                             f"{[v.shape for v in values]} in {source.name!r}; the model "
                             f"needs {expected}")
        layer.set_weights(values)


def weights_cache_dir():
    """Where fetched and converted weights live: ``$KERAS_HOME/models`` (~/.keras)."""
    return os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")),
                        CACHE_SUBDIR)


def imagenet_weights_file(arch):
    """The published ImageNet weights of ``arch`` as a cached ``.weights.h5`` file.

    The first call fetches the checkpoint with ``keras.utils.get_file`` (sha256
    checked, cached in :func:`weights_cache_dir`), converts it once and caches
    the result beside it; later calls read the cache.

    Raises:
        ValueError: ``arch`` has no published checkpoint, or it cannot be
            fetched (the message says which file to put where).
    """
    if arch not in PUBLISHED:
        raise ValueError(f"weights='imagenet': no published ImageNet checkpoint for "
                         f"{arch!r}; available for {', '.join(PUBLISHED)} (ImageNet stem); "
                         "pass the path of a checkpoint instead")
    cache_dir = weights_cache_dir()
    converted = os.path.join(cache_dir, f"keras_resnet_{arch}_imagenet.weights.h5")
    if os.path.exists(converted):
        return converted
    url, sha256 = PUBLISHED[arch]
    fname = url.rsplit("/", 1)[1]
    try:
        checkpoint = keras.utils.get_file(fname, url, file_hash=sha256,
                                          cache_dir=os.path.dirname(cache_dir),
                                          cache_subdir=CACHE_SUBDIR)
    except Exception as e:  # noqa: BLE001 (get_file raises URLError, HTTPError, OSError, ...)
        raise ValueError(
            f"weights='imagenet': cannot fetch {url} ({type(e).__name__}: {e}). Without "
            f"network access, download that file elsewhere and put it at "
            f"{os.path.join(cache_dir, fname)} (sha256 {sha256}); the next call finds it "
            "there.") from None
    from keras_resnet.model import build_model

    full = build_model(arch)  # the reference: ImageNet stem, 1000 classes
    load_torch_state_dict(full, read_checkpoint(checkpoint))
    with atomic.replacing(converted, suffix=".weights.h5") as tmp:
        full.save_weights(tmp)
    return converted


def _load_imagenet(model, arch):
    """ImageNet weights into ``model``; a head of another size stays fresh."""
    from keras_resnet.model import build_model

    path = imagenet_weights_file(arch)  # checks ``arch`` first
    reference = build_model(arch)
    reference.load_weights(path)
    top = [layer for layer in model.layers if layer.name == "predictions"]
    same_head = bool(top) and tuple(top[0].kernel.shape) == tuple(
        reference.get_layer("predictions").kernel.shape)
    copy_weights(reference, model, skip=() if same_head else ("predictions",))


# ------------------------------------------------------------------------ writing


def save_torch_weights(model, path):
    """Write ``model``'s weights as ``.safetensors`` with the reference key names.

    PyTorch users load it with ``load_state_dict(safetensors.torch.load_file(path),
    strict=True)`` into torchvision's (or timm's, for ResNet-D and pre-activation
    models) definition. Written to a temporary file, then renamed.
    """
    from safetensors.numpy import save_file

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"path: got {path!r}; must end in .safetensors")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"path: folder {folder!r} does not exist")
    with atomic.replacing(path) as tmp:
        save_file(torch_state_dict(model), tmp, metadata={"format": "pt"})
    return path
