import csv

import keras
import pytest
from helpers import run_main, run_script, write_folder

from keras_resnet import cli as main_cli
from keras_resnet import compare as C


def cli(*args):
    return run_script("compare_models.py", *args)


def test_flops_are_counted_from_the_graph():
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    assert C.count_flops(keras.Model(inputs, outputs)) == 2 * 8 * 8 * 4 * 27
    resnet18 = C.build_candidate("resnet18", (32, 32), 10, (0, 0, 0), (1, 1, 1))
    assert 1.10e9 < C.count_flops(resnet18) < 1.13e9  # 0.556 GMACs + BN / ReLU / add


@pytest.mark.parametrize("name", ["mobilenetv2", "vgg16", "small_cnn"])
def test_candidates_take_32px_and_have_a_fresh_head(name):
    model = C.build_candidate(name, (32, 32), 7, (0, 0, 0), (1, 1, 1))
    assert model.output.shape == (None, 7)
    assert model.get_layer("predictions").units == 7


@pytest.mark.slow
def test_small_compare_run_writes_table_csv_and_plots(tmp_path):
    folder = write_folder(tmp_path / "data", per_class=12, size=32)
    out = tmp_path / "cmp"
    r = cli("--models", "small_cnn,resnet18", "--data-dir", str(folder), "--output-dir",
            str(out), "--train-images", "32", "--eval-images", "12", "--batch-size", "8",
            "--latency-runs", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[1/2] small_cnn" in r.stdout and "[2/2] resnet18" in r.stdout
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["model"] for row in rows] == ["small_cnn", "resnet18"]
    assert int(rows[1]["params"]) == 11_173_962 - 10 * 513 + 3 * 513 + 9_600  # + BN stats
    assert float(rows[1]["gflops"]) > float(rows[0]["gflops"]) > 0
    # Scored on exactly the 12 test images: top-1 is a whole number of them.
    for row in rows:
        hits = float(row["test_top1"]) * 12
        assert abs(hits - round(hits)) < 12 * 5e-5
    assert "| resnet18 | 11.18 |" in (out / "results.md").read_text()
    for png in ("accuracy_vs_latency.png", "accuracy_vs_params.png"):
        assert (out / png).stat().st_size > 1000


@pytest.mark.parametrize("flags, message", [
    (["--models", "resnet18,alexnet"], "models: unknown ['alexnet']"),
    (["--epochs", "0"], "epochs: got 0; the budget must be"),
    (["--train-images", "0"], "train_images: got 0"),
    (["--data-dir", "/no/such/data"], "data_dir: '/no/such/data' is not a directory"),
])
def test_bad_input_fails_before_work(flags, message, tmp_path):
    r = run_main(main_cli.compare_main, "--output-dir", str(tmp_path / "o"), *flags)
    assert r.returncode == 2 and message in r.stderr
    assert not (tmp_path / "o").exists()
