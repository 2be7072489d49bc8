import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from helpers import SHARED_CIFAR10 as SHARED
from helpers import write_folder
from PIL import Image

from keras_resnet import data as D


@pytest.fixture
def messy_folder(tmp_path):
    root = write_folder(tmp_path)
    train = root / "train"
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(train / "cat" / "gray.png")
    Image.fromarray(np.full((16, 16, 4), 9, np.uint8)).save(train / "dog" / "rgba.png")
    Image.fromarray(np.full((40, 24, 3), 200, np.uint8)).save(train / "eel" / "big.jpg")
    (train / "cat" / "notes.txt").write_text("not an image")
    (train / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    os.makedirs(train / "fox")  # an empty class folder
    return root


def test_image_folder_converts_and_skips(messy_folder):
    s = D.load_splits(data_dir=str(messy_folder), validation_size=4)
    assert s.class_names == ["cat", "dog", "eel", "fox"]
    # notes.txt is not listed (extension); the 4 validation files are carved from
    # the 22 listed, then each part is scanned: broken.jpg is skipped wherever it fell.
    rep, val = s.report["train"], s.report["validation"]
    assert rep["skipped_not_image"] == 1
    assert rep["skipped_unreadable"] + val["skipped_unreadable"] == 1
    assert rep["converted_mode"] + val["converted_mode"] == 2
    assert rep["empty_class_folders"] == ["fox"] and val["carved_from"] == "train"
    sizes = {k: rep["sizes"].get(k, 0) + val["sizes"].get(k, 0) for k in ("16x16", "40x24")}
    assert sizes == {"16x16": 20, "40x24": 1}
    assert s.image_size == (16, 16)
    assert s.num_validation == 4 - val["skipped_unreadable"]
    assert (s.num_train + s.num_validation, s.num_test) == (21, 18)
    images = [(x.numpy(), int(y)) for x, y in s.train.concatenate(s.validation)]
    assert len(images) == 21 and all(x.shape == (16, 16, 3) and x.dtype == np.uint8
                                     for x, _ in images)
    assert any(np.all(x == 7) for x, _ in images)  # grayscale -> 3 equal channels
    assert any(np.all(x == 200) for x, _ in images)  # resized, not cropped


def test_validation_is_carved_before_the_subsets(tmp_path):
    root = str(write_folder(tmp_path, per_class=6))

    def images(ds):
        return sorted(x.numpy().tobytes() for x, _ in ds)

    full = D.load_splits(data_dir=root, validation_size=6)
    small = D.load_splits(data_dir=root, validation_size=6, max_train_images=4,
                          max_eval_images=6)
    assert (small.num_train, small.num_validation, small.num_test) == (4, 6, 6)
    assert images(small.validation) == images(full.validation)
    assert not set(images(small.train)) & set(images(small.validation))
    capped = D.load_splits(data_dir=root, validation_size=6, max_eval_images=2)
    assert (capped.num_train, capped.num_validation, capped.num_test) == (12, 2, 2)
    assert set(images(capped.validation)) <= set(images(full.validation))


def test_validation_folder_is_used_when_present(tmp_path):
    root = write_folder(tmp_path, per_class=2)
    os.rename(root / "test", root / "val")
    s = D.load_splits(data_dir=str(root))
    assert (s.num_train, s.num_validation, s.num_test) == (6, 6, 0)


def test_channel_stats_match_numpy(tmp_path):
    root = write_folder(tmp_path, per_class=3)
    s = D.load_splits(data_dir=str(root), validation_size=0)
    arr = np.stack([x.numpy() for x, _ in s.train]).astype(np.float64)
    np.testing.assert_allclose(s.mean, arr.mean((0, 1, 2)), atol=1e-3)
    np.testing.assert_allclose(s.std, arr.std((0, 1, 2)), atol=1e-3)


def test_missing_folder_and_split(tmp_path):
    with pytest.raises(D.DataError, match="image folder not found: .*nope"):
        D.load_splits(data_dir=str(tmp_path / "nope"))
    os.makedirs(tmp_path / "x" / "test" / "a")
    with pytest.raises(D.DataError, match="split not found: .*train"):
        D.load_splits(data_dir=str(tmp_path / "x"))


def test_tfds_not_prepared_gives_clear_error(tmp_path):
    with pytest.raises(D.DataError, match="'cifar10' is not prepared in .*image folder"):
        D.load_splits("cifar10", tfds_data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="dataset: got 'mnist'"):
        D.load_splits("mnist", tfds_data_dir=str(tmp_path))


def test_tfds_cifar100_mock(tmp_path):
    with tfds.testing.mock_data(num_examples=12):
        s = D.load_splits("cifar100", tfds_data_dir=str(tmp_path), validation_size=4)
        info = tfds.builder("cifar100", data_dir=str(tmp_path)).info
    # Class names come from tfds's info (the mock's builder has only label indices).
    assert s.class_names == info.features["label"].names and s.num_classes == 100
    assert s.mean == D.KNOWN_STATS["cifar100"][0]
    assert s.num_train == 12 and s.num_validation == 12  # mock data ignores slicing


def test_tfds_cifar10_mock(tmp_path):
    with tfds.testing.mock_data(num_examples=40):
        s = D.load_splits("cifar10", tfds_data_dir=str(tmp_path), validation_size=10,
                          max_train_images=30)
        assert s.num_classes == 10 and s.mean == D.KNOWN_STATS["cifar10"][0]
        assert (s.num_train, s.num_validation, s.num_test) == (30, 40, 40)
        batch = next(iter(D.make_train_dataset(s.train, 8, 10, seed=0)))
    assert batch[0].shape == (8, 32, 32, 3) and batch[1].shape == (8, 10)
    assert batch[0].dtype == tf.float32


def batches(ds, n=3):
    return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]


def toy_dataset(n=64, size=16, classes=4):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return tf.data.Dataset.from_tensor_slices((x, (np.arange(n) % classes).astype("int32")))


ALL_ON = D.AugmentConfig(rotation=15, color_jitter=0.3, erasing=0.5, mixup=0.4,
                         randaugment=2)


def test_same_seed_same_batches_over_two_epochs():
    def run(seed):
        ds = D.make_train_dataset(toy_dataset(), 16, 4, augment=ALL_ON, seed=seed)
        return batches(ds, 4) + batches(ds, 4)  # two epochs of one dataset
    a, b, c = run(5), run(5), run(6)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a[0][0], c[0][0])
    assert not np.array_equal(a[0][0], a[4][0])  # a new epoch draws anew


def test_crop_flip_draws_per_image():
    one = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    ds = tf.data.Dataset.from_tensor_slices((np.stack([one] * 32), np.zeros(32, "int32")))
    x, _ = next(iter(D.make_train_dataset(ds, 32, 2, seed=1)))
    x = x.numpy()
    distinct = {x[i].tobytes() for i in range(32)}
    assert len(distinct) >= 10  # one crop window per batch would give 2 (flip only)
    # pad-4 crop = integer shift with zero fill: every output pixel is a pixel of the
    # input or zero
    assert set(np.unique(x)) <= set(np.unique(one)) | {0}
    assert np.all(x[:, 4:12, 4:12] == x[:, 4:12, 4:12].round())


def test_mixup_gives_soft_labels_that_sum_to_one():
    ds = D.make_train_dataset(toy_dataset(), 16, 4, augment=D.AugmentConfig(mixup=1.0))
    _, y = next(iter(ds))
    np.testing.assert_allclose(y.numpy().sum(1), 1.0, rtol=1e-5)
    assert np.mean((y.numpy() > 0) & (y.numpy() < 1)) > 0.2


def test_cutmix_and_in_model():
    _, y = next(iter(D.make_train_dataset(toy_dataset(), 16, 4,
                                          augment=D.AugmentConfig(cutmix=1.0))))
    np.testing.assert_allclose(y.numpy().sum(1), 1.0, rtol=1e-5)
    in_model = D.AugmentConfig(in_model=True)
    x, _ = next(iter(D.make_train_dataset(toy_dataset(), 64, 4, augment=in_model, seed=0,
                                          shuffle_buffer=1)))
    raw = np.stack([a.numpy() for a, _ in toy_dataset()])
    np.testing.assert_array_equal(x.numpy(), raw)  # left for the model to augment
    aug = D.build_augmenter(in_model, (16, 16), seed=0)
    assert [la.name for la in aug.layers] == ["aug_crop", "aug_flip"]


def test_pad_crop_graph_is_one_int32_gather():
    """On TensorFlow the crop is one int32 gather and no transpose: Keras's
    take_along_axis casts its indices to int64 and transposes them, which oneDNN
    does not take (an error line on stderr during training, and a slower fallback)."""
    from keras_resnet.augment import RandomPadCrop

    layer = RandomPadCrop(4, seed=0)
    fn = tf.function(lambda t: layer(t, training=True))
    graph = fn.get_concrete_function(tf.TensorSpec((None, 8, 8, 3))).graph
    ops = graph.get_operations()
    gathers = [op for op in ops if op.type.startswith("Gather")]
    assert len(gathers) == 1 and gathers[0].get_attr("Tindices") == tf.int32
    assert not [op.type for op in ops if op.type in ("Transpose", "ConjugateTranspose")]


def marked_images(n):
    """n images whose left column holds their number: a mirrored one has it on the right."""
    images = np.zeros((n, 4, 4, 1), np.uint8)
    images[:, :, 0, 0] = np.arange(1, n + 1)[:, None]
    return images


def mirrored_per_pass(batches_of, n, passes):
    """[{image number: mirrored?}] per pass, from (image, one-hot label) batches."""
    seen = []
    for x, y in batches_of:
        for image, label in zip(np.asarray(x), np.asarray(y), strict=True):
            i = int(label.argmax())
            assert image[0, 0, 0] == i + 1 or image[0, -1, 0] == i + 1
            seen.append((i, bool(image[0, -1, 0] == i + 1)))
    out = []
    for p in range(passes):
        one = seen[p * n:(p + 1) * n]
        assert sorted(i for i, _ in one) == list(range(n))  # each image once per pass
        out.append(dict(one))
    return out, [[i for i, _ in seen[p * n:(p + 1) * n]] for p in range(passes)]


def test_alternating_flip_mirrors_each_image_every_other_pass():
    n = 16
    ds = tf.data.Dataset.from_tensor_slices((marked_images(n), np.arange(n, dtype="int32")))
    aug = D.AugmentConfig(crop_padding=0, alternate_flip=True)
    train = D.make_train_dataset(ds, 4, n, augment=aug, seed=3, shuffle_buffer=n)
    flips, orders = mirrored_per_pass(train.take(3 * n // 4).as_numpy_iterator(), n, 3)
    assert 0 < sum(flips[0].values()) < n  # the first pass mirrors some, not all
    for i in range(n):
        assert flips[1][i] != flips[0][i] and flips[2][i] == flips[0][i]
    assert orders[0] != orders[1]  # each pass is shuffled anew
    assert D.build_augmenter(aug, (4, 4)).layers[-1].name == "aug_crop"  # no random flip
    # The memory pipeline (arrays.BatchFeed) alternates the same way.
    from keras_resnet import arrays

    feed = arrays.BatchFeed(marked_images(n), np.arange(n), 4, n, shuffle=True, seed=3,
                            alternate_flip=True)
    batches_of = []
    for _ in range(3):
        batches_of += [feed[i] for i in range(len(feed))]
        feed.on_epoch_end()
    flips, _ = mirrored_per_pass(batches_of, n, 3)
    assert 0 < sum(flips[0].values()) < n
    assert all(flips[1][i] != flips[0][i] and flips[2][i] == flips[0][i] for i in range(n))
    with pytest.raises(ValueError, match="alternate_flip: needs a source held in memory"):
        D.make_train_dataset(ds, 4, n, augment=aug, shuffle_buffer=0)


@pytest.mark.parametrize("kwargs, match", [
    ({"crop_flip": False, "alternate_flip": True}, "alternate_flip: needs crop_flip"),
    ({"erasing": 1.5}, "erasing"), ({"rotation": -1}, "rotation"),
    ({"mixup": 0.2, "cutmix": 0.2}, "exclusive")])
def test_bad_augment_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        D.AugmentConfig(**kwargs)


def test_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size: got 0"):
        D.make_train_dataset(toy_dataset(), 0, 4)


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="shared CIFAR-10 JPEG copy not present")
def test_real_cifar10_jpeg_folder():
    s = D.load_splits(data_dir=SHARED, max_train_images=300, max_eval_images=100,
                      validation_size=50)
    assert s.class_names[0] == "airplane" and s.class_names[9] == "truck"
    assert (s.num_train, s.num_validation, s.num_test) == (300, 50, 100)
    assert s.image_size == (32, 32) and s.report["train"]["skipped_unreadable"] == 0
    np.testing.assert_allclose(s.mean, (125.3, 122.9, 113.9), atol=8)
    labels = [int(y) for _, y in s.test]
    assert set(labels) <= set(range(10)) and len(set(labels)) > 5


@pytest.mark.slow
def test_benchmark_pipeline_script(tmp_path):
    import json
    import subprocess
    import sys

    root = write_folder(tmp_path, per_class=20, size=32)
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "benchmark_pipeline.py")
    r = subprocess.run([sys.executable, script, "--data-dir", str(root), "--batch-size", "8",
                        "--pipeline-batches", "4", "--steps", "2", "--rounds", "1"],
                       check=False, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("pipeline_img_s", "train_fed_img_s", "train_inmemory_img_s"):
        assert result[key] > 0
    onednn = "on" if os.environ.get("TF_ENABLE_ONEDNN_OPTS") != "0" else "off"
    assert "cores" in result["machine"] and result["machine"].endswith(f"oneDNN {onednn}")


# ------------------------------------------------------------- folders at real sizes


def test_resized_crop_and_centre_crop_shapes_and_content():
    tf.random.set_seed(0)
    image = tf.constant(np.arange(60 * 40 * 3).reshape(60, 40, 3) % 251, tf.uint8)
    crops = [D.random_resized_crop(image, (24, 24), (0.3, 1.0), (0.75, 1.333)).numpy()
             for _ in range(5)]
    assert all(c.shape == (24, 24, 3) and c.dtype == np.uint8 for c in crops)
    assert len({c.tobytes() for c in crops}) > 1  # each call cuts its own window
    # Eval view of a 60x40 (portrait) image at 20x20, crop ratio 0.5: resized so the
    # shorter side is 40, then the centre 20x20 of the 60x40 image (rows 20..40).
    ramp = tf.constant(np.repeat(np.arange(60, dtype=np.uint8)[:, None, None] * 4, 40, 1)
                       .repeat(3, 2))
    view = D.center_crop_resize(ramp, (20, 20), 0.5).numpy()
    assert view.shape == (20, 20, 3)
    assert 4 * 19 <= view[:, :, 0].mean() <= 4 * 41
    same = tf.constant(np.full((20, 20, 3), 9, np.uint8))
    np.testing.assert_array_equal(D.center_crop_resize(same, (20, 20)).numpy(), same.numpy())


@pytest.fixture
def mixed_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            os.makedirs(tmp_path / split / c)
            for i in range(6):
                h, w = (20 + 7 * i, 30) if i % 2 else (32, 18 + 5 * i)
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                    tmp_path / split / c / f"{i}.jpg")
    return tmp_path


def test_streamed_folder_reshuffles_and_keeps_every_image(mixed_folder):
    def images(s):
        return [x.numpy().tobytes() for x, _ in s.train]

    memory = D.load_splits(data_dir=str(mixed_folder), validation_size=0, image_size=16,
                           cache="memory")
    streamed = D.load_splits(data_dir=str(mixed_folder), validation_size=0, image_size=16,
                             cache="none")
    assert streamed.pre_shuffled and not memory.pre_shuffled
    assert streamed.report["train"]["cache"] == "none"
    first, second = images(streamed), images(streamed)
    assert sorted(first) == sorted(second) == sorted(images(memory)) and first != second
    tiny = D.load_splits(data_dir=str(mixed_folder), validation_size=0, image_size=16)
    assert tiny.report["train"]["cache"] == "memory"  # "auto": 12 small images fit


def test_auto_cache_streams_what_does_not_fit(mixed_folder):
    s = D._folder_splits(str(mixed_folder), 0, None, None, 16, 0, memory_budget=1000)
    assert s.report["train"]["cache"] == "none" and s.pre_shuffled


def test_disk_cache(mixed_folder, tmp_path):
    cache = tmp_path / "cache"
    s = D.load_splits(data_dir=str(mixed_folder), validation_size=0, image_size=16,
                      cache=str(cache))
    assert len(list(s.train)) == 12 and len(list(s.test)) == 12
    assert any(name.startswith("train") for name in os.listdir(cache))


def test_resized_crop_pipeline_takes_images_of_any_size(mixed_folder):
    s = D.load_splits(data_dir=str(mixed_folder), validation_size=2, image_size=24,
                      resize_train=False, eval_crop_ratio=0.875)
    shapes = {tuple(x.shape) for x, _ in s.train}
    assert len(shapes) > 1  # decoded at their own sizes
    ds = D.make_train_dataset(s.train, 4, 2, augment=D.AugmentConfig(crop="resized"),
                              image_size=(24, 24))
    x, y = next(iter(ds))
    assert x.shape == (4, 24, 24, 3) and y.shape == (4, 2)
    assert {tuple(x.shape) for x, _ in s.test} == {(24, 24, 3)}


def test_workers_read_disjoint_equal_shards(tmp_path):
    root = str(write_folder(tmp_path, per_class=7))
    shards = [D.load_splits(data_dir=root, validation_size=0, shard=(2, i)) for i in (0, 1)]
    seen = [{x.numpy().tobytes() for x, _ in s.train} for s in shards]
    assert shards[0].num_train == shards[1].num_train == 10
    assert not seen[0] & seen[1]


def test_tiff_is_skipped_by_the_scan_and_a_cut_jpeg_by_the_pipeline(tmp_path):
    root = write_folder(tmp_path, per_class=4)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "train" / "cat" / "x.tif")
    os.rename(root / "train" / "cat" / "x.tif", root / "train" / "cat" / "x.jpg")
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)).save(
        tmp_path / "whole.jpg")
    whole = (tmp_path / "whole.jpg").read_bytes()
    (root / "train" / "dog" / "cut.jpg").write_bytes(whole[:len(whole) * 2 // 3])
    s = D.load_splits(data_dir=str(root), validation_size=0)
    assert s.report["train"]["skipped_unreadable"] == 1  # the TIFF (a .jpg name)
    decoded = list(s.train)  # the cut JPEG passes the header scan, is dropped here
    assert s.num_train == 13 and len(decoded) == 12
    assert all(x.shape == (16, 16, 3) for x, _ in decoded)


def test_a_single_class_folder_is_refused(tmp_path):
    root = write_folder(tmp_path, classes=("cat",))
    with pytest.raises(D.DataError, match="images of 1 class; a classifier needs at least 2"):
        D.load_splits(data_dir=str(root))


def test_pack_images_round_trip_byte_for_byte(tmp_path):
    """scripts/pack_images.py: one .npz out of a folder and the same tree back; bad
    input stops with a message and leaves nothing behind."""
    from helpers import run_script

    root = write_folder(tmp_path / "images", per_class=3, size=8)
    (root / "README.md").write_text("notes")
    packed = tmp_path / "images.npz"
    result = run_script("pack_images.py", "pack", root, packed)
    assert result.returncode == 0 and "19 files" in result.stdout, result.stderr
    result = run_script("pack_images.py", "unpack", packed, tmp_path / "back")
    assert result.returncode == 0 and "19 files" in result.stdout, result.stderr

    def tree(top):
        return {os.path.relpath(os.path.join(d, f), top): open(os.path.join(d, f), "rb").read()
                for d, _, files in os.walk(top) for f in files}

    assert tree(tmp_path / "back") == tree(root) and len(tree(root)) == 19
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    escape = tmp_path / "escape.npz"
    np.savez(escape, data=np.zeros(1, np.uint8), offsets=np.array([0, 1]),
             paths=np.array([b"a/../../evil"]))
    for args, message in ((["unpack", packed, tmp_path / "back"], "exists; unpack into a new"),
                          (["pack", tmp_path / "nope", tmp_path / "x.npz"], "is not a folder"),
                          (["unpack", junk, tmp_path / "new"], "is not a file written by"),
                          (["unpack", escape, tmp_path / "new"], "outside the folder")):
        result = run_script("pack_images.py", *map(str, args))
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["back", "escape.npz", "images", "images.npz",
                                            "junk.npz"]
