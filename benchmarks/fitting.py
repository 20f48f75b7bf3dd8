"""Benchmark: seconds per photo of `python -m recon.predict --fit` on the CPU (scikit-image's
astronaut), first photo (with compilation) and steady state, and the landmark errors.

    PYTHONPATH=. python benchmarks/fitting.py                      # default schedule
    PYTHONPATH=. python benchmarks/fitting.py --overlay docs/astronaut_overlay.png

Prints one JSON line. Detection (MediaPipe) is timed separately from the fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="fits after the first one")
    parser.add_argument("--overlay", default=None, help="write the overlay PNG here")
    args = parser.parse_args()

    import jax
    from PIL import Image
    from skimage import data

    from recon import predict
    from recon.image import detect
    from recon.photo import fitting

    image = data.astronaut()
    options = fitting.FitOptions()
    with detect.FaceDetector() as detector:
        start = time.perf_counter()
        faces = detector(image)
        detect_seconds = time.perf_counter() - start
    face = faces[0]
    reconstructor = predict.Reconstructor(fit=True, fit_options=options)
    first, visuals = reconstructor(image, face)
    steady, cpu = [], []
    for _ in range(args.repeats):
        cpu_start = time.process_time()
        result, visuals = reconstructor(image, face)
        cpu.append(time.process_time() - cpu_start)
        steady.append(result.seconds)
    if args.overlay:
        Image.fromarray(reconstructor.overlay(image, visuals)).save(args.overlay)
    print(json.dumps({
        "benchmark": "fit astronaut (512x512, 1 face)",
        "steps": {"rigid": options.rigid_steps, "landmarks": options.landmark_steps,
                  "appearance": options.appearance_steps,
                  "photometric": options.photometric_steps},
        "detect_s": round(detect_seconds, 3),
        "first_photo_s_incl_compile": round(first.seconds, 2),
        "s_per_photo": round(float(np.median(steady)), 2) if steady else None,
        # CPU seconds of this process (all threads): the figure that does not depend on how
        # busy the machine is.
        "cpu_s_per_photo": round(float(np.median(cpu)), 2) if cpu else None,
        "crop": dataclasses.asdict(reconstructor.crop),
        "box_size_px": round(face.box_size, 1),
        "landmark_error_px": {"initial": round(result.initial_error_px, 3),
                              "final": round(result.final_error_px, 3)},
        "backend": jax.default_backend(), "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }))


if __name__ == "__main__":
    main()
