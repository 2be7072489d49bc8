"""Hyperparameter search: the space file's checks, a search's outputs, a failed
(NaN) trial, resume without re-running trials, chief / worker on loopback."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers import ROOT, run_main, write_folder

from keras_resnet import cli, tuning
from keras_resnet import training as T

BASE = T.smoke_config(precision="float32")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("tune") / "data", per_class=10, size=16)


def fixed(folder, out, *more):
    return ["--preset", "smoke", "--data-dir", folder, "--image-size", "16",
            "--max-train-images", "24", "--validation-size", "9", "--precision", "float32",
            "--output-dir", out, *more]


def space_file(tmp_path, space, name="space.json"):
    path = tmp_path / name
    path.write_text(json.dumps(space) if not isinstance(space, str) else space)
    return path


def read_trials(out):
    with open(os.path.join(out, "trials.csv")) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("space, tuner, message", [
    ({"lr_max": {"log": [0.1, 1]}}, "random", "'lr_max' is not a config field; searchable: "),
    ({"epochs": {"int": [1, 3]}}, "random", "'epochs' is part of the fixed config"),
    ({"data_dir": {"choice": ["a"]}}, "random", "'data_dir' is part of the fixed config"),
    ({"lr": [0.1, 1]}, "random", "'lr' must be an object with one of log, float, int, choice"),
    ({"lr": {"log": [0.1, 1], "float": [0, 1]}}, "random", "must be an object with one of"),
    ({"lr": {"log": [0.1, 1], "steps": 2}}, "random", "must be an object with one of"),
    ({"lr": {"log": [1, 0.1]}}, "random", "the range [1, 0.1] is empty or inverted"),
    ({"lr": {"float": [0.1, 0.1]}}, "random", "the range [0.1, 0.1] is empty or inverted"),
    ({"lr": {"log": [0, 1]}}, "random", "a log range must be above 0"),
    ({"lr": {"log": [0.1]}}, "random", "log takes [low, high], two numbers"),
    ({"lr": {"log": ["0.1", 1]}}, "random", "log takes [low, high], two numbers"),
    ({"lr": {"log": [0.1, 1], "step": 1}}, "random", "step must be a number > 1 (a factor)"),
    ({"lr": {"choice": []}}, "random", "choice must be a non-empty list"),
    ({"lr": {"choice": [0.1, 0.1]}}, "random", "choice lists a value twice"),
    ({"batch_size": {"float": [8, 64]}}, "random", "'batch_size' is an integer field"),
    ({"batch_size": {"int": [8.5, 64]}}, "random", "int takes whole numbers"),
    ({"batch_size": {"choice": [8, "16"]}}, "random", ("'batch_size' is an integer field; "
     "the choice '16' is not")),
    ({"optimizer": {"choice": ["sgd", "lion"]}}, "random", ("value 'lion' is not allowed "
     "(optimizer: got 'lion'; must be one of sgd")),
    ({"optimizer": {"float": [0, 1]}}, "random", "'optimizer' is a string field: use choice"),
    ({"crop_flip": {"choice": [True, 1]}}, "random", "'crop_flip' is a boolean field"),
    ({"momentum": {"float": [0.5, 1.5]}}, "random", "value 1.5 is not allowed (momentum"),
    ({"lr": {"log": [0.01, 1]}}, "grid", "grid search needs a 'step' for a log range"),
    ([], "random", "must be a non-empty JSON object"),
    ({}, "random", "must be a non-empty JSON object"),
])
def test_bad_space_is_refused_naming_the_entry(space, tuner, message):
    with pytest.raises(tuning.SpaceError) as e:
        tuning.check_space(space, BASE, tuner)
    assert message in str(e.value)


def test_default_space_is_valid_for_every_tuner_and_its_grid_is_counted():
    for tuner in tuning.TUNERS:
        tuning.check_space(tuning.DEFAULT_SPACE, BASE, tuner)
    assert tuning.grid_size(tuning.DEFAULT_SPACE) == 5 * 5 * 3
    hp = tuning.hyperparameters({"lr": {"log": [0.05, 0.8], "step": 2},
                                 "batch_size": {"int": [8, 32], "step": 8},
                                 "label_smoothing": {"choice": [0, 0.1]}})
    assert hp.get("lr") == 0.05 and hp.get("batch_size") == 8
    assert tuning.grid_size({"batch_size": {"int": [8, 32], "step": 8}}) == 4


def test_every_tuner_makes_its_oracle():
    for tuner in tuning.TUNERS:  # the Bayesian one needs scipy (keras-tuner[bayesian])
        oracle = tuning.make_oracle(tuner, tuning.DEFAULT_SPACE, 12, 0, 3)
        assert oracle.objective.name == "val_accuracy" and oracle.objective.direction == "max"
        assert sorted(oracle.get_space().values) == sorted(tuning.DEFAULT_SPACE)
    assert tuning.make_oracle("bayesian", tuning.DEFAULT_SPACE, 12, 0, 3).num_initial_points == 4


def test_bad_search_options_fail_before_anything_is_written(folder, tmp_path):
    out = tmp_path / "out"
    cases = [
        (["--tuner", "grid", "--max-trials", "3"], "the grid has 75 points but max_trials is 3"),
        (["--max-trials", "0"], "max_trials: got 0; must be an integer >= 1"),
        (["--validation-size", "0"], ("validation_size: a search scores trials on the "
         "validation split")),
        (["--space", tmp_path / "missing.json"], "--space: cannot read"),
        (["--space", space_file(tmp_path, "{lr: 1", "a.json")], "--space: cannot read"),
        (["--space", space_file(tmp_path, {"lr": {"log": [1, 0.1]}}, "b.json")],
         "empty or inverted"),
        (["--lr", "-1"], "lr: got -1.0; must be > 0"),
    ]
    for flags, message in cases:
        result = run_main(cli.tune_main, *fixed(folder, out), *flags)
        assert result.returncode == 2, flags
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not out.exists(), flags


def test_search_outputs_failed_nan_trial_resume_and_a_changed_space(folder, tmp_path):
    out = str(tmp_path / "search")
    space = space_file(tmp_path, {"lr": {"choice": [0.05, 1e30]},
                                  "label_smoothing": {"choice": [0.0, 0.2]}})
    argv = fixed(folder, out, "--space", space, "--tuner", "grid", "--max-trials", "4",
                 "--optimizer", "sgd", "--schedule", "constant")
    result = run_main(cli.tune_main, *argv)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_trials(out)
    assert [r["trial"] for r in rows] == ["0", "1", "2", "3"]
    assert {(float(r["lr"]), float(r["label_smoothing"])) for r in rows} == {
        (0.05, 0.0), (0.05, 0.2), (1e30, 0.0), (1e30, 0.2)}
    for r in rows:  # every lr = 1e30 trial died of NaN and is recorded as failed
        if float(r["lr"]) > 1:
            assert r["status"] == "FAILED" and "NaN" in r["note"], r
        else:
            assert r["status"] == "COMPLETED" and 0 <= float(r["val_accuracy"]) <= 1
            assert int(r["epochs"]) == 1 and float(r["seconds"]) > 0
    with open(os.path.join(out, "results.md")) as f:
        results = f.read()
    assert "2 completed of 4 trial(s)" in results and "Failed trials:" in results
    assert os.path.getsize(os.path.join(out, "search.png")) > 0
    for trial in ("0", "1", "2", "3"):  # the test split was never read
        run = os.path.join(out, "kt", f"trial_{trial}", "run")
        assert os.path.isdir(run) and not os.path.exists(os.path.join(run, "test_metrics.json"))
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    best = summary["best"]
    assert best["val_accuracy"] == max(float(r["val_accuracy"]) for r in rows
                                       if r["status"] == "COMPLETED")

    # best_config.json is a --config file train_cifar10.py accepts as it is
    config = cli.resolve_train_config(["--config", os.path.join(out, "best_config.json"),
                                       "--output-dir", str(tmp_path / "full")])
    assert config.lr == best["lr"] and config.label_smoothing == best["label_smoothing"]
    assert config.data_dir == str(folder) and config.epochs == T.TrainConfig.epochs
    config.validate()

    # the same command again: nothing is re-run
    stamps = {t: os.path.getmtime(os.path.join(out, "kt", f"trial_{t}", "trial.json"))
              for t in "0123"}
    again = run_main(cli.tune_main, *argv)
    assert again.returncode == 0 and "tuner tuner0: trial" not in again.stdout
    assert stamps == {t: os.path.getmtime(os.path.join(out, "kt", f"trial_{t}", "trial.json"))
                      for t in "0123"}
    # another space or tuner for the same directory is refused
    other = run_main(cli.tune_main, *fixed(folder, out, "--tuner", "random"))
    assert other.returncode == 2 and "holds another search (different tuner, space" in \
        other.stderr
    other = run_main(cli.tune_main, *argv, "--batch-size", "4")
    assert other.returncode == 2 and "fixed field batch_size" in other.stderr


def test_hyperband_sets_each_trials_epochs(folder, tmp_path, monkeypatch):
    # The trials' training is replaced by a score of lr and epochs: this checks how the
    # tuner hands Hyperband's budgets to training (the search test above trains for real).
    seen = []

    def fake_train(config, score_test=True):
        assert not score_test
        seen.append(config.epochs)
        return {"best_val_accuracy": config.epochs / 10 - abs(config.lr - 0.05),
                "epochs": config.epochs}

    monkeypatch.setattr(tuning.training, "train", fake_train)
    out = str(tmp_path / "hb")
    space = space_file(tmp_path, {"lr": {"log": [0.01, 0.2]}})
    result = run_main(cli.tune_main, *fixed(folder, out, "--space", space, "--tuner",
                                            "hyperband", "--epochs", "3"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_trials(out)
    assert [int(r["epochs"]) for r in rows] == seen
    # first bracket: three 1-epoch trials, then the best one at the full 3 epochs
    assert sorted(set(seen)) == [1, 3] and seen[:4] == [1, 1, 1, 3]
    assert all(r["status"] == "COMPLETED" for r in rows)


def test_a_full_disk_stops_the_search_with_one_message_and_the_trial_resumes(
        folder, tmp_path, monkeypatch):
    import errno

    calls = []

    def full_disk(config, score_test=True):
        calls.append(config.output_dir)
        raise OSError(errno.ENOSPC, "No space left on device",
                      os.path.join(config.output_dir, "best.keras"))

    monkeypatch.setattr(tuning.training, "train", full_disk)
    out = str(tmp_path / "full")
    argv = fixed(folder, out, "--tuner", "random", "--max-trials", "2")
    result = run_main(cli.tune_main, *argv)
    assert result.returncode == 2 and len(calls) == 1  # the search stopped at once
    assert "No space left on device" in result.stderr and "best.keras" in result.stderr
    assert "run the same command again to resume" in result.stderr
    monkeypatch.setattr(tuning.training, "train", lambda config, score_test=True: calls.append(
        config.output_dir) or {"best_val_accuracy": 0.5, "epochs": 1})
    assert run_main(cli.tune_main, *argv).returncode == 0
    assert calls[1] == calls[0]  # the unfinished trial ran again, in its own folder
    assert [r["status"] for r in read_trials(out)] == ["COMPLETED", "COMPLETED"]


def test_failures_in_a_row_stop_the_search_with_a_message(folder, tmp_path, monkeypatch):
    def broken(config, score_test=True):
        raise ValueError("data_dir: something every trial trips on")

    monkeypatch.setattr(tuning.training, "train", broken)
    out = str(tmp_path / "broken")
    result = run_main(cli.tune_main, *fixed(folder, out, "--tuner", "random"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "search stopped: Number of consecutive failures exceeded the limit of 5" in \
        result.stderr
    rows = read_trials(out)
    assert len(rows) == tuning.FAILURES_IN_A_ROW and {r["status"] for r in rows} == {"FAILED"}
    assert all("something every trial trips on" in r["note"] for r in rows)


def _tune_command(folder, out, *more):
    return [sys.executable, os.path.join(ROOT, "scripts", "tune.py"),
            *map(str, fixed(folder, out, *more))]


def _env(**more):
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **more}


@pytest.mark.slow
def test_killed_search_resumes_without_rerunning_finished_trials(folder, tmp_path):
    out = str(tmp_path / "killed")
    space = space_file(tmp_path, {"lr": {"choice": [0.02, 0.05]}})
    command = _tune_command(folder, out, "--space", space, "--tuner", "grid", "--max-trials",
                            "2", "--epochs", "2")
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    backup = os.path.join(out, "kt", "trial_1", "run", "backup")
    deadline = time.time() + 300
    while not os.path.isdir(backup) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)  # trial 0 is done and trial 1 is mid-way
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.isdir(backup)
    first = os.path.getmtime(os.path.join(out, "kt", "trial_0", "run", "history.csv"))
    rerun = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600,
                           check=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "trial 0 " not in rerun.stdout and "trial 1 " in rerun.stdout
    assert os.path.getmtime(os.path.join(out, "kt", "trial_0", "run", "history.csv")) == first
    rows = read_trials(out)
    assert [r["status"] for r in rows] == ["COMPLETED"] * 2
    with open(os.path.join(out, "kt", "trial_1", "run", "history.csv")) as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["0", "1"]
    left = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files
            if f.endswith(".tmp") or f == ".lock"]
    assert not left


@pytest.mark.slow
def test_chief_and_two_workers_on_loopback_share_one_search(folder, tmp_path):
    out = str(tmp_path / "dist")
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    space = space_file(tmp_path, {"lr": {"choice": [0.01, 0.02, 0.05, 0.1]}})
    command = _tune_command(folder, out, "--space", space, "--tuner", "random",
                            "--max-trials", "4")
    cluster = {"KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": port}
    procs = {tid: subprocess.Popen(command, env=_env(KERASTUNER_TUNER_ID=tid, **cluster),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
             for tid in ("chief", "tuner0", "tuner1")}
    outputs = {tid: p.communicate(timeout=600)[0] for tid, p in procs.items()}
    for tid, p in procs.items():
        assert p.returncode == 0, (tid, outputs[tid][-3000:])
    ran = {tid: {line.split("trial ")[1].split()[0] for line in outputs[tid].splitlines()
                 if line.startswith(f"tuner {tid}: trial ")} for tid in ("tuner0", "tuner1")}
    assert ran["tuner0"] and ran["tuner1"] and not ran["tuner0"] & ran["tuner1"], ran
    assert ran["tuner0"] | ran["tuner1"] == {"0", "1", "2", "3"}
    rows = read_trials(out)  # one shared result, written by the chief
    assert len(rows) == 4 and all(r["status"] == "COMPLETED" for r in rows)
    assert os.path.exists(os.path.join(out, "best_config.json"))
