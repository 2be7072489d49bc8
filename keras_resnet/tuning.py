"""Hyperparameter search on KerasTuner: a space file, four tuners, one trial = one run.

A search space names ``TrainConfig`` fields with their ranges (see ``SpaceError``
for the format); KerasTuner's oracles (grid, random, Bayesian, Hyperband) pick
the values and its project folder makes the search resumable and distributable
(chief / worker over gRPC). Each trial is ``training.train`` on the fixed
config with the trial's values, in its own run directory, scored on the
validation split only: the test split is never read during a search.
"""

import csv
import dataclasses
import functools
import json
import math
import os
import time
import typing

import keras_tuner as kt
import numpy as np

from keras_resnet import atomic, locking, training

TUNERS = ("grid", "random", "bayesian", "hyperband")
KINDS = ("log", "float", "int", "choice")
OBJECTIVE = "val_accuracy"
PROJECT = "kt"  # KerasTuner's project folder inside the output directory
HYPERBAND_FACTOR = 3
FAILURES_IN_A_ROW = 5  # then the fixed part of the config is likely at fault: stop
# Fields a space may not search: where data and results live, and how a run is
# executed or reported; the search budget is the fixed part (--epochs, --max-*).
NOT_SEARCHED = ("dataset", "data_dir", "tfds_data_dir", "output_dir", "epochs",
                "max_train_images", "max_eval_images", "validation_size", "cache",
                "strategy", "verbose", "tta_flip", "tta_shift", "seed")
# best_config.json leaves these out, so that a full run uses the recipe's budget.
BUDGET_FIELDS = ("output_dir", "epochs", "max_train_images", "max_eval_images")
DEFAULT_SPACE = {
    "lr": {"log": [0.0025, 0.04], "step": 2},      # around the recipe's (Muon) 0.01
    "weight_decay": {"log": [0.0025, 0.04], "step": 2},  # and its 0.01
    "label_smoothing": {"choice": [0.0, 0.1, 0.2]},
}


TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}


class SpaceError(ValueError):
    """A bad search space. Each entry is ``"field": {KIND: RANGE}``, KIND one of
    log / float / int with RANGE ``[low, high]`` (optional ``"step"``), or choice
    with a list of values."""


# --------------------------------------------------------------------------- space


def read_space(path):
    """The space in a JSON file (None: the built-in ``DEFAULT_SPACE``)."""
    if path is None:
        return DEFAULT_SPACE
    try:
        with open(path) as f:
            space = json.load(f)
    except (OSError, ValueError) as e:
        raise SpaceError(f"--space: cannot read {path!r}: {e}") from None
    return space


def check_space(space, base, tuner):
    """Raise ``SpaceError`` naming the first bad entry of ``space`` for ``base``."""
    if not isinstance(space, dict) or not space:
        raise SpaceError("--space: must be a non-empty JSON object of config fields, e.g. "
                         '{"lr": {"log": [0.05, 0.8]}}')
    hints = typing.get_type_hints(type(base))
    fields = [f.name for f in dataclasses.fields(base)]
    for name, entry in space.items():
        where = f"--space: {name!r}"
        if name not in fields:
            raise SpaceError(f"{where} is not a config field; searchable: "
                             f"{', '.join(f for f in fields if f not in NOT_SEARCHED)}")
        if name in NOT_SEARCHED:
            raise SpaceError(f"{where} is part of the fixed config (budget, data or output); "
                             "set it with its flag")
        kinds = [k for k in KINDS if isinstance(entry, dict) and k in entry]
        extra = set(entry) - set(KINDS) - {"step"} if isinstance(entry, dict) else set()
        if len(kinds) != 1 or extra:
            raise SpaceError(f"{where} must be an object with one of {', '.join(KINDS)} "
                             f"(and an optional step); got {json.dumps(entry)}")
        kind, value = kinds[0], entry[kinds[0]]
        field_type = next(t for t in (typing.get_args(hints[name]) or (hints[name],))
                          if t is not type(None))
        if kind == "choice":
            if not isinstance(value, list) or not value:
                raise SpaceError(f"{where}: choice must be a non-empty list of values")
            if len(set(map(json.dumps, value))) != len(value):
                raise SpaceError(f"{where}: choice lists a value twice")
            if "step" in entry:
                raise SpaceError(f"{where}: a choice takes no step")
            candidates = value
        else:
            ok = (isinstance(value, list) and len(value) == 2
                  and all(_is_number(v) for v in value))
            if not ok:
                raise SpaceError(f"{where}: {kind} takes [low, high], two numbers; got "
                                 f"{json.dumps(value)}")
            low, high = value
            if field_type is int and kind != "int":
                raise SpaceError(f"{where} is an integer field: use int or choice, not {kind}")
            if field_type not in (int, float):
                raise SpaceError(f"{where} is {TYPE_NAMES[field_type]} field: use choice")
            if kind == "int" and not all(float(v).is_integer() for v in value):
                raise SpaceError(f"{where}: int takes whole numbers; got {value}")
            if not low < high:
                raise SpaceError(f"{where}: the range [{low}, {high}] is empty or inverted; "
                                 "low must be < high")
            if kind == "log" and low <= 0:
                raise SpaceError(f"{where}: a log range must be above 0; got low {low}")
            step = entry.get("step")
            if step is not None and (not _is_number(step) or step <= (1 if kind == "log"
                                                                      else 0)):
                raise SpaceError(f"{where}: step must be a number > "
                                 f"{'1 (a factor)' if kind == 'log' else '0'}; got {step!r}")
            if tuner == "grid" and step is None and kind != "int":
                raise SpaceError(f"{where}: grid search needs a 'step' for a {kind} range "
                                 "(or use choice)")
            candidates = [low, high]
        for v in candidates:  # the value must have the field's type and pass its check
            try:
                if kind == "choice":
                    _check_value(name, v, field_type)
                dataclasses.replace(base, **{name: _cast(v, field_type)}).validate()
            except ValueError as e:
                raise SpaceError(f"{where}: value {v!r} is not allowed ({e})") from None


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_value(name, value, field_type):
    if not training.fits_type(value, field_type):
        raise SpaceError(f"--space: {name!r} is {TYPE_NAMES[field_type]} field; the choice "
                         f"{value!r} is not")


def _cast(value, field_type):
    return float(value) if field_type is float else value


def hyperparameters(space):
    """KerasTuner ``HyperParameters`` for a checked space."""
    hp = kt.HyperParameters()
    for name, entry in space.items():
        if "choice" in entry:
            values = entry["choice"]
            if any(isinstance(v, float) for v in values):  # [0, 0.1]: one type, float
                values = [float(v) for v in values]
            hp.Choice(name, values)
        elif "int" in entry:
            low, high = (int(v) for v in entry["int"])
            hp.Int(name, low, high, step=int(entry.get("step", 1)))
        else:
            kind = "log" if "log" in entry else "float"
            low, high = entry[kind]
            hp.Float(name, float(low), float(high), step=entry.get("step"),
                     sampling="log" if kind == "log" else "linear")
    return hp


def grid_size(space):
    """How many points a grid search over ``space`` has."""
    size = 1
    for entry in space.values():
        if "choice" in entry:
            size *= len(entry["choice"])
        elif "int" in entry:
            low, high = entry["int"]
            size *= int(high - low) // int(entry.get("step", 1)) + 1
        elif "log" in entry:
            low, high = entry["log"]
            size *= int(math.log(high / low) / math.log(entry["step"]) + 1e-9) + 1
        else:
            low, high = entry["float"]
            size *= int((high - low) / entry["step"] + 1e-9) + 1
    return size


# --------------------------------------------------------------------------- tuner


class _AtomicState:
    """KerasTuner writes its state files (oracle.json, trial.json, tuner json) in
    place; a kill mid-write would leave a truncated file that stops the resume.
    These overrides write each through a temporary file and a rename."""

    def save(self):
        training.write_json(self._get_oracle_fname(), self.get_state())

    def _save_trial(self, trial):
        training.write_json(os.path.join(self._get_trial_dir(trial.trial_id), "trial.json"),
                            trial.get_state())


class _GridResume:
    """KerasTuner 1.4's grid oracle does not save the order of the points it has
    tried (``_ordered_ids``), so a resumed grid search dies with a KeyError on the
    next point; after a reload the order is rebuilt from the trials."""

    def reload(self):
        super().reload()
        order = sorted(self.trials, key=functools.cmp_to_key(
            lambda a, b: self._compare(self.trials[a].hyperparameters.values,
                                       self.trials[b].hyperparameters.values)))
        for trial_id in order:
            self._ordered_ids.insert(trial_id)
        self._populate_next = list(order)


ORACLES = {"grid": kt.oracles.GridSearchOracle, "random": kt.oracles.RandomSearchOracle,
           "bayesian": kt.oracles.BayesianOptimizationOracle,
           "hyperband": kt.oracles.HyperbandOracle}


def make_oracle(tuner, space, max_trials, seed, max_epochs):
    mixins = (_AtomicState, _GridResume) if tuner == "grid" else (_AtomicState,)
    cls = type(f"Resumable{ORACLES[tuner].__name__}", (*mixins, ORACLES[tuner]), {})
    common = {"objective": kt.Objective(OBJECTIVE, "max"), "seed": seed,
              "hyperparameters": hyperparameters(space),
              "max_consecutive_failed_trials": FAILURES_IN_A_ROW}
    if tuner == "hyperband":  # its brackets set the number of trials
        return cls(max_epochs=max_epochs, factor=HYPERBAND_FACTOR, **common)
    if tuner == "bayesian":  # KerasTuner's default, 3 random points per dimension, would
        #                      leave a 12-trial search of 3 fields mostly random
        common["num_initial_points"] = max(2, max_trials // 3)
    return cls(max_trials=max_trials, **common)


class RunTuner(kt.engine.base_tuner.BaseTuner):
    """A KerasTuner tuner whose trial is one ``training.train`` run of ``base``
    with the trial's values (Hyperband sets its epochs), in the trial's folder."""

    def __init__(self, oracle, base, directory):
        super().__init__(oracle, directory=directory, project_name=PROJECT)
        self.base = base

    def run_trial(self, trial):
        import keras

        values = {k: v for k, v in trial.hyperparameters.values.items()
                  if not k.startswith("tuner/")}
        epochs = trial.hyperparameters.values.get("tuner/epochs", self.base.epochs)
        run_dir = os.path.join(self.get_trial_dir(trial.trial_id), "run")
        print(f"tuner {self.tuner_id}: trial {trial.trial_id} {json.dumps(values)}, "
              f"{epochs} epoch(s) -> {run_dir}", flush=True)
        keras.backend.clear_session()
        start = time.time()
        try:
            config = dataclasses.replace(self.base, **values, epochs=epochs,
                                         output_dir=run_dir)
            config.validate()
            report = training.train(config, score_test=False)
        except OSError as e:  # a full disk: every later trial would fail the same way, so
            #                   the search stops (the trial stays unfinished, to be re-run)
            raise kt.errors.FatalError(e) from None
        except ValueError as e:  # NaN before any checkpoint, a bad combination, ...
            self._failed(trial, str(e))
        if "stopped" in report:
            self._failed(trial, report["stopped"])
        return {OBJECTIVE: report.get("best_val_accuracy", float("nan")),  # NaN: failed
                "epochs": report["epochs"],
                "seconds": round(time.time() - start, 1)}

    def _failed(self, trial, reason):
        print(f"tuner {self.tuner_id}: trial {trial.trial_id} failed: {reason}", flush=True)
        raise kt.errors.FailedTrialError(reason) from None

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        if not self._is_worker():
            write_results(self.oracle, self.directory)

    def save(self):
        if not self._is_worker():
            self.oracle.save()
        training.write_json(self._get_tuner_fname(), self.get_state())


# --------------------------------------------------------------------------- search


def search_record(base, space, tuner, max_trials):
    """What a search directory is bound to: a rerun must ask the same."""
    fixed = {k: v for k, v in dataclasses.asdict(base).items()
             if k not in training.RESUMABLE_FIELDS}
    return {"tuner": tuner, "space": space, "max_trials": max_trials, "fixed": fixed}


def check_search_dir(out, record):
    """Refuse an output directory that holds another search; record this one."""
    path = os.path.join(out, "search.json")
    if os.path.exists(path):
        saved = training.read_json_object(path)
        if saved is None:
            raise ValueError(f"output_dir: {path!r} is damaged; restore it or use a new "
                             "--output-dir")
        differ = [k for k in ("tuner", "space", "max_trials") if saved.get(k) != record[k]]
        fixed = sorted(k for k in set(saved.get("fixed", {})) | set(record["fixed"])
                       if saved.get("fixed", {}).get(k) != record["fixed"].get(k))
        if differ or fixed:
            what = ", ".join(differ + [f"fixed field {k}" for k in fixed])
            raise ValueError(f"output_dir: {out!r} holds another search (different {what}); "
                             "resume it with the same command, or use a new --output-dir")
    os.makedirs(out, exist_ok=True)
    training.write_json(path, record)


def search(base, space=None, tuner="bayesian", max_trials=12):
    """Run (or resume) a search into ``base.output_dir``; returns the trials' rows.

    Under KerasTuner's chief / worker environment (``KERASTUNER_TUNER_ID``,
    ``KERASTUNER_ORACLE_IP``, ``KERASTUNER_ORACLE_PORT``) the chief serves the
    oracle and writes the results; each worker runs trials.

    Raises:
        ValueError: a bad space, tuner or fixed config, or an output directory
            that holds another search; before anything is written.
    """
    space = DEFAULT_SPACE if space is None else space
    if tuner not in TUNERS:
        raise ValueError(f"tuner: got {tuner!r}; must be one of {', '.join(TUNERS)}")
    if not (training._is_int(max_trials) and max_trials >= 1):
        raise ValueError(f"max_trials: got {max_trials!r}; must be an integer >= 1")
    base.validate()
    if base.validation_size == 0:
        raise ValueError("validation_size: a search scores trials on the validation split; "
                         "it must be > 0 (or None for a tenth)")
    check_space(space, base, tuner)
    if tuner == "grid" and grid_size(space) > max_trials:
        raise ValueError(f"max_trials: the grid has {grid_size(space)} points but max_trials "
                         f"is {max_trials}; pass --max-trials {grid_size(space)} or narrow "
                         "the space (a grid cut short would search only its first corner)")
    out = base.output_dir
    training.check_output_dir(out)
    # KerasTuner prints each failed trial's traceback while its DEBUG flag (no public
    # switch) is on; the one-line reason is printed by run_trial and kept in trials.csv.
    kt.src.config.DEBUG = False
    tuner_id = os.environ.get("KERASTUNER_TUNER_ID", "tuner0")
    # One process per tuner id: a second one with the same id would run its trials twice.
    lock_dir = out if tuner_id == "tuner0" else os.path.join(out, "locks", tuner_id)
    with locking.hold(lock_dir):
        check_search_dir(out, search_record(base, space, tuner, max_trials))
        oracle = make_oracle(tuner, space, max_trials, base.seed, base.epochs)
        run_tuner = RunTuner(oracle, base, out)
        try:
            run_tuner.search()
        except kt.errors.FatalError as e:
            raise e.args[0] from None  # the OSError of a trial
        except RuntimeError:  # too many failed trials in a row: record them, then stop
            if not run_tuner._is_worker():
                write_results(oracle, out)
            raise
        if run_tuner._is_worker():
            return []
        return write_results(oracle, out)  # on the chief: every worker's trial is over


# -------------------------------------------------------------------------- results


def trial_rows(oracle):
    """One dict per trial, in start order: id, status, values, objective, epochs, seconds."""
    names = list(oracle.get_space().values)
    rows = []
    for trial_id in sorted(oracle.trials):
        trial = oracle.trials[trial_id]
        hp = trial.hyperparameters.values
        row = {"trial": trial_id, "status": trial.status}
        row.update({n: hp.get(n) for n in names if not n.startswith("tuner/")})
        for metric in (OBJECTIVE, "epochs", "seconds"):
            value = (trial.metrics.get_best_value(metric)
                     if trial.metrics.exists(metric) else None)
            row[metric] = value
        if row["epochs"] is not None or "tuner/epochs" in hp:
            row["epochs"] = int(row["epochs"] or hp["tuner/epochs"])
        message = (trial.message or "").strip().splitlines()
        row["note"] = message[-1].split("Error: ", 1)[-1] if message else ""
        rows.append(row)
    return rows


def write_results(oracle, out):
    """trials.csv, results.md, search.png and best_config.json from the oracle's trials."""
    rows = trial_rows(oracle)
    if not rows:
        return rows
    columns = list(rows[0])
    with (atomic.replacing(os.path.join(out, "trials.csv")) as tmp,
          open(tmp, "w", newline="") as f):
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    done = sorted((r for r in rows if r["status"] == "COMPLETED" and r[OBJECTIVE] is not None),
                  key=lambda r: -r[OBJECTIVE])
    searched = [c for c in columns if c not in ("trial", "status", OBJECTIVE, "epochs",
                                                "seconds", "note")]
    lines = [f"# Search results: {len(done)} completed of {len(rows)} trial(s)", "",
             (f"Objective: best {OBJECTIVE} of a trial's epochs (validation split; the test "
              "split is not read)."), "",
             "| rank | trial | " + " | ".join(searched) + f" | {OBJECTIVE} | epochs | seconds |",
             "|" + "---|" * (len(searched) + 5)]
    for rank, r in enumerate(done, 1):
        lines.append(f"| {rank} | {r['trial']} | " + " | ".join(_fmt(r[c]) for c in searched)
                     + f" | {r[OBJECTIVE]:.4f} | {_fmt(r['epochs'])} | {_fmt(r['seconds'])} |")
    failed = [r for r in rows if r["status"] not in ("COMPLETED", "RUNNING")]
    if failed:
        lines += ["", "Failed trials:", ""]
        lines += [f"- trial {r['trial']} ({r['status']}): {r['note']}" for r in failed]
    atomic.write(os.path.join(out, "results.md"), "\n".join(lines) + "\n")
    if done:
        best = done[0]
        with open(os.path.join(out, "search.json")) as f:
            record = json.load(f)
        config = {k: v for k, v in record["fixed"].items() if k not in BUDGET_FIELDS}
        config.update({c: best[c] for c in searched})
        training.write_json(os.path.join(out, "best_config.json"), config)
        log_axes = {name for name, entry in record["space"].items() if "log" in entry}
        plot_search(rows, searched, os.path.join(out, "search.png"), log_axes)
    return rows


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def plot_search(rows, searched, path, log_axes=()):
    """The objective per trial (with the best so far) and against each searched value
    (on a log axis for the fields in ``log_axes``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "COMPLETED" and r[OBJECTIVE] is not None]
    fig, axes = plt.subplots(1, 1 + len(searched), figsize=(4 * (1 + len(searched)), 3.4),
                             squeeze=False)
    ax = axes[0][0]
    order = list(range(1, len(done) + 1))
    scores = [r[OBJECTIVE] for r in done]
    ax.plot(order, scores, "o", label="trial")
    ax.plot(order, np.maximum.accumulate(scores), "-", label="best so far")
    ax.set(xlabel="trial (completed, in order)", ylabel=OBJECTIVE, title="objective per trial")
    ax.legend()
    for ax, name in zip(axes[0][1:], searched):
        xs = [r[name] for r in done]
        if all(_is_number(x) for x in xs):
            ax.plot(xs, scores, "o")
            if name in log_axes:
                ax.set_xscale("log")
        else:  # choices: one column per value
            labels = sorted({str(x) for x in xs})
            ax.plot([labels.index(str(x)) for x in xs], scores, "o")
            ax.set_xticks(range(len(labels)), labels)
        ax.set(xlabel=name, title=f"{OBJECTIVE} vs {name}")
    fig.tight_layout()
    with atomic.replacing(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
