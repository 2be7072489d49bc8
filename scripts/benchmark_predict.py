"""Images per second of ``predict.py`` on a folder, for each model artifact.

For each artifact (a .keras file or run directory, a SavedModel folder, a .tflite
file) the whole command is timed on the folder and on one image of it, in
``--rounds`` alternating rounds (every artifact once per round, so a slower phase of
this shared machine touches all alike). Reported per artifact: the median wall
seconds of both, the whole-command rate (images / wall) and the steady rate with
start-up taken out ((images - 1) / (wall - wall of one image)). The machine is
printed first; the last line is one JSON object.

    python scripts/benchmark_predict.py runs/r/best.keras saved_models/r/saved_model \
        saved_models/r/model_float32.tflite --images ../shared/data/cifar10-jpeg/test/cat
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from keras_resnet.benchmark import machine

PREDICT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "predict.py")


def wall(artifact, path, batch_size):
    start = time.perf_counter()
    subprocess.run([sys.executable, PREDICT, artifact, path, "--batch-size", str(batch_size),
                    "--top-k", "1"], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", help=".keras / run directory / SavedModel / "
                        ".tflite")
    parser.add_argument("--images", required=True, help="a folder of images")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if not os.path.isdir(args.images):
        parser.error(f"--images: {args.images!r} is not a folder")
    files = sorted(f for f in os.listdir(args.images) if not f.startswith("."))
    if not files:
        parser.error(f"--images: {args.images!r} holds no files")
    one = os.path.join(args.images, files[0])
    print(f"machine: {machine()}", flush=True)
    times = {a: {"folder": [], "one": []} for a in args.artifacts}
    for _ in range(args.rounds):
        for artifact in args.artifacts:
            times[artifact]["folder"].append(wall(artifact, args.images, args.batch_size))
            times[artifact]["one"].append(wall(artifact, one, args.batch_size))
    results = {}
    for artifact, t in times.items():
        folder, single = float(np.median(t["folder"])), float(np.median(t["one"]))
        results[artifact] = {
            "images": len(files), "wall_s": round(folder, 2), "one_image_wall_s": round(single, 2),
            "images_per_s": round(len(files) / folder, 1),
            "steady_images_per_s": round((len(files) - 1) / max(folder - single, 1e-9), 1)}
        r = results[artifact]
        print(f"{artifact}: {r['images']} images in {r['wall_s']} s ({r['images_per_s']} "
              f"images/s whole command; {r['steady_images_per_s']} images/s past the "
              f"{r['one_image_wall_s']} s start-up)", flush=True)
    print(json.dumps({"machine": machine(), "rounds": args.rounds,
                      "batch_size": args.batch_size, "results": results}))


if __name__ == "__main__":
    main()
