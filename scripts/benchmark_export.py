"""Size and batch-1 latency of each exported artifact, with 1 and 2 threads.

Reads one or more folders written by ``export_model.py``; for each artifact:
size on disk, then median and p90 latency of one image over ``--runs`` runs
after ``--warmup`` runs, in each of ``--rounds`` rounds. A round measures every
artifact once, in turn, so a phase of this shared machine running slower
touches all of them alike; the figures pool the runs of all rounds. TFLite runs
in the LiteRT interpreter (``num_threads``); the SavedModel runs in a child
process per thread count and round, because TensorFlow's thread pools are fixed
at start-up. The last output line is one JSON object.

    python scripts/benchmark_export.py saved_models/resnet18_cifar
    python scripts/benchmark_export.py runs/export-direct runs/export --rounds 5
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np


def saved_model_child(path, threads, runs, warmup):
    from keras_resnet.benchmark import latency_ms  # before TensorFlow: its oneDNN default
    from keras_resnet.predict import SavedModelRunner

    # isort: split
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)

    runner = SavedModelRunner(path)
    image = np.random.default_rng(0).integers(0, 256, (1, *runner.image_size, 3), np.uint8)
    print(json.dumps(latency_ms(runner, image, runs, warmup)["times_ms"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="export_model.py output folders")
    parser.add_argument("--runs", type=int, default=200, help="per artifact and round")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return saved_model_child(args.child[0], int(args.child[1]), args.runs, args.warmup)
    if args.runs < 100:
        parser.error("--runs must be >= 100")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    threads = [int(t) for t in args.threads.split(",")]
    artifacts = {}
    for folder in args.folders:
        report_path = os.path.join(folder, "export_report.json")
        if not os.path.exists(report_path):
            parser.error(f"{folder!r} holds no export_report.json (run export_model.py)")
        with open(report_path) as f:
            for fmt, info in json.load(f)["artifacts"].items():
                key = fmt if len(args.folders) == 1 else f"{os.path.basename(folder)}:{fmt}"
                artifacts[key] = (fmt, info)

    from keras_resnet.benchmark import latency_ms, machine
    from keras_resnet.predict import TFLiteModel

    print(f"machine: {machine()}", flush=True)

    def measure(fmt, path, n):
        if fmt == "saved_model":
            out = subprocess.run([sys.executable, __file__, path, "--child", path, str(n),
                                  "--runs", str(args.runs), "--warmup", str(args.warmup)],
                                 capture_output=True, text=True, check=True)
            return json.loads(out.stdout.strip().splitlines()[-1])
        model = TFLiteModel(path, num_threads=n)
        image = np.random.default_rng(0).integers(0, 256, (1, *model.image_size, 3), np.uint8)
        return latency_ms(model, image, args.runs, args.warmup)["times_ms"]

    times = {(key, n): [] for key in artifacts for n in threads}
    for _ in range(args.rounds):
        for key, (fmt, info) in artifacts.items():
            for n in threads:
                times[key, n] += measure(fmt, info["path"], n)
    results = {}
    for key, (fmt, info) in artifacts.items():
        row = {"size_mb": round(info["size_bytes"] / 1e6, 2)}
        for n in threads:
            t = times[key, n]
            row[f"threads_{n}"] = {"median_ms": round(float(np.median(t)), 3),
                                   "p90_ms": round(float(np.percentile(t, 90)), 3)}
        results[key] = row
        print(f"{key:22} {row['size_mb']:8.2f} MB  " + "  ".join(
            f"{n} thr: median {row[f'threads_{n}']['median_ms']:.3f} ms, "
            f"p90 {row[f'threads_{n}']['p90_ms']:.3f} ms" for n in threads), flush=True)
    print(json.dumps({"machine": machine(), "runs": args.runs, "rounds": args.rounds, "warmup": args.warmup,
                      "artifacts": results}))


if __name__ == "__main__":
    main()
