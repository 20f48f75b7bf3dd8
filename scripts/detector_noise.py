"""How far the photo path's detector (MediaPipe -> iBUG-68) is from the true landmarks, and how
far that moves the crop: the measurement behind `config.data.scene.landmark_noise`.

    python scripts/detector_noise.py --subjects 60 [--noise 0.02] [--out runs/detector_noise.json]

Synthetic heads of the default's scene distribution are rendered into wide "photos" (a 1.6 x
box crop at 256 px); `recon.image.detect.FaceDetector` finds their landmarks; for each image it
compares the detected 68 points with the rendered ones (per point, as a fraction of the
landmark box's mean side) and the crop each gives (`recon.image.crop_matrix` of the run's
`CropSpec`): scale ratio, rotation, and shift of the crop centre in crop sides. The same crop
statistics are then computed for the training-time model of that error (the true points plus
Gaussian noise of `--noise` box sides, `recon.data.synthetic.crop_geometry`), so the two can be
compared. Needs the `photo` extra (mediapipe).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def _default_options():
    from recon.options import load_config_file
    from recon.training.regressor.options import read_options

    return read_options(load_config_file(REPO / "configs" / "default.py"))


def crop_change(reference: np.ndarray, other: np.ndarray, size: int) -> tuple:
    """(scale ratio - 1, rotation degrees, centre shift in crop sides) of `other` vs
    `reference` (both image -> crop similarities)."""
    from recon.image import crop as crop_lib

    scale = crop_lib.similarity_scale(other) / crop_lib.similarity_scale(reference)
    angle = np.degrees(np.arctan2(other[1, 0], other[0, 0])
                       - np.arctan2(reference[1, 0], reference[0, 0]))
    centre = crop_lib.transform_points(crop_lib.invert(reference), [[size / 2, size / 2]])
    moved = crop_lib.transform_points(other, centre)[0] - size / 2
    return scale - 1.0, angle, float(np.linalg.norm(moved) / size)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=60)
    parser.add_argument("--noise", type=float, default=None,
                        help="the training noise model to compare (default: the config's)")
    parser.add_argument("--out", default=None, help="write the summary JSON here")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import flame_jax
    from recon.data import sources, synthetic
    from recon.image import crop as crop_lib
    from recon.image import detect

    options = _default_options()
    spec = options.data.crop
    noise = options.data.scene.landmark_noise if args.noise is None else args.noise
    model = flame_jax.synthetic()
    host = synthetic.HostModel.from_model(model)
    train_config = sources.synthetic_config(options.data)
    # The photo: the same scenes seen through a wide box crop, exact landmarks.
    photo_config = dataclasses.replace(
        train_config, crop=crop_lib.CropSpec(anchor="box", scale=2.4, size=256),
        image_size=256, landmark_noise=0.0, box_scale_jitter=0.0, box_shift_jitter=0.0)
    point_errors, detected_changes, modelled_changes, failures = [], [], [], 0
    with detect.FaceDetector() as detector:
        for subject in range(args.subjects):
            scenes = synthetic.sample_scenes(host, photo_config, 500_000 + subject, range(2), 0)
            rendered, _ = synthetic.render_batch(model, photo_config, scenes)
            for k in range(2):
                example, _ = synthetic.compose_example(
                    {name: value[k] for name, value in rendered.items()}, photo_config, seed=0,
                    subject_index=500_000 + subject, image_index=k)
                image = np.round(np.clip(example["crops"], 0, 1) * 255).astype(np.uint8)
                truth = example["landmarks"].astype(np.float64)
                faces = detector(image)
                if not faces:
                    failures += 1
                    continue
                found = faces[0].landmarks_68.astype(np.float64)
                side = float(np.mean(truth.max(0) - truth.min(0)))
                point_errors.append(np.linalg.norm(found - truth, axis=-1) / side)
                box = crop_lib.box_from_landmarks(truth)
                reference = crop_lib.crop_matrix(spec, box=box, landmarks=truth)
                detected = crop_lib.crop_matrix(spec, box=crop_lib.box_from_landmarks(found),
                                                landmarks=found)
                detected_changes.append(crop_change(reference, detected, spec.size))
            # The training-time model of the same error on these scenes.
            landmarks_3d = np.asarray(synthetic.scene_landmarks(
                model, jax.tree.map(jnp.asarray, scenes)), np.float64)
            exact = synthetic.crop_geometry(landmarks_3d, scenes,
                                            dataclasses.replace(train_config, landmark_noise=0.0))
            noisy = synthetic.crop_geometry(landmarks_3d, scenes,
                                            dataclasses.replace(train_config,
                                                                landmark_noise=noise))
            for k in range(2):
                modelled_changes.append(crop_change(exact.matrix[k], noisy.matrix[k],
                                                    spec.size))
    errors = np.asarray(point_errors)
    detected_changes, modelled_changes = np.asarray(detected_changes), np.asarray(
        modelled_changes)
    five = [45, 42, 36, 39, 33]

    def stats(changes):
        return {"scale_change_abs_mean": float(np.abs(changes[:, 0]).mean()),
                "rotation_deg_abs_mean": float(np.abs(changes[:, 1]).mean()),
                "centre_shift_crop_sides_mean": float(changes[:, 2].mean())}

    summary = {
        "images": 2 * args.subjects, "no_face": failures, "crop": dataclasses.asdict(spec),
        "detector_point_error_box_sides": {
            "all_68_mean": float(errors.mean()), "inner_51_mean": float(errors[:, 17:].mean()),
            "contour_17_mean": float(errors[:, :17].mean()),
            "dlib_five_points_mean": float(errors[:, five].mean())},
        "crop_change_detected_vs_true": stats(detected_changes),
        f"crop_change_training_noise_{noise}": stats(modelled_changes),
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
