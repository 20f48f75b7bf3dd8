"""Find the 68 landmarks of every image of MICA-format datasets once, for the 2D losses.

    python -m recon.data.prepare_mica ROOT NAME [NAME ...] [--image-paths-dir DIR]
    python -m recon.data.prepare_mica ROOT NAME --from-landmarks DIR

For every image listed in `<image_paths>/<NAME>.npy` (`recon.data.mica`'s layout) the iBUG-68
landmarks are stored at `recon.data.mica.landmark_path(ROOT, NAME, image path)`: a (68, 2)
float32 `.npy` in pixels of the stored image, written atomically. An image where no face was
found (or that cannot be read) gets an empty array (`MicaDataset` then gives its landmarks
weight 0) and is listed, with the reason, in `<ROOT>/<NAME>/landmarks_68/failures.json`, which
is always written. Resumable: an image whose landmark file exists is skipped, so a killed run
continues where it stopped (and the failures of earlier runs stay listed).

Landmarks come from:
  * the photo path's detector (`recon.image.detect.FaceDetector`, MediaPipe: the `photo` extra),
    largest face. MICA's `arcface_input` images are tight 224 crops, too tight for BlazeFace:
    the image is padded with a black border (a fraction of its side on every side) before
    detecting, and the points are moved back. Measured on 120 renders of synthetic heads in
    MICA's crop (`recon.data.synthetic`, clean images), a face was found in 45 / 85 / 105 /
    108 / 111 of them with a border of 0 / 0.25 / 0.5 / 0.75 / 1.0 x the side (of which 0 / 2 /
    1 / 0 / 3 wrong: median error of the 51 inner points > 15 px), and in 116 (1 wrong) with the
    borders `PADDINGS` tried in turn; median error of the inner points 4.3 px at 224;
  * or `--from-landmarks DIR` when the dataset ships landmark files: `DIR/<image path without
    its suffix>.npy` or `.txt` ((68, 2), pixels of the stored image; a `.txt` holds 68 rows of
    "x y" or "x,y"); `{name}` in DIR is replaced by each NAME. A missing file is a failure; a
    file of another shape is an error naming it.

Exit status: 0 when every image has landmarks, 1 when some failed (listed in failures.json),
2 for a usage error (missing root, dataset folder or image list; mediapipe absent).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Callable, Dict, List, Optional, Sequence

import cv2
import numpy as np

from flame_jax.errors import FlameFileError, FlameFileNotFoundError
from flame_jax.fileio import atomic_write
from flame_jax.safe_pickle import load_npy
from recon.data import mica
from recon.image.detect import PhotoExtraMissing
from recon.image.io import ImageReadError, read_image

FAILURES_FILE = "failures.json"
# Black border around the tight crop before detection, as fractions of the image side, tried in
# turn until a face is found (measurements in the module docstring).
PADDINGS = (0.5, 0.25, 0.75, 0.0)
LANDMARK_SUFFIXES = (".npy", ".txt")


class PrepareError(Exception):
    """The datasets cannot be prepared (missing root, dataset folder, image list, detector)."""


@dataclasses.dataclass
class DatasetReport:
    """What `prepare` did for one dataset name."""

    name: str
    total: int = 0
    written: int = 0
    skipped: int = 0
    failures: Dict[str, str] = dataclasses.field(default_factory=dict)  # image -> reason

    @property
    def failures_path(self) -> str:
        return f"{self.name}/{mica.LANDMARK_FOLDER}/{FAILURES_FILE}"


def detect_landmarks(detector: Callable, image: np.ndarray,
                     paddings: Sequence[float] = PADDINGS) -> Optional[np.ndarray]:
    """(68, 2) float32 landmarks (pixels of `image`) of its largest face, or None.

    detector: `FaceDetector` (image uint8 RGB -> faces, largest first). The image is padded with
    a black border of each fraction of its larger side in turn until a face is found.
    """
    image = np.ascontiguousarray(image, np.uint8)
    side = max(image.shape[:2])
    for padding in paddings:
        border = int(round(padding * side))
        padded = cv2.copyMakeBorder(image, border, border, border, border, cv2.BORDER_CONSTANT,
                                    value=(0, 0, 0)) if border else image
        faces = detector(padded)
        if faces:
            return (np.asarray(faces[0].landmarks_68, np.float32) - np.float32(border))
    return None


def read_landmark_file(folder: pathlib.Path, relative: str) -> Optional[np.ndarray]:
    """The dataset's own landmarks of image `relative`: `folder/<relative without suffix>.npy`
    or `.txt` -> (68, 2) float32, None when neither exists; FlameFileError naming a bad file."""
    stem = folder / pathlib.PurePosixPath(relative).with_suffix("")
    for suffix in LANDMARK_SUFFIXES:
        path = stem.with_name(stem.name + suffix)
        if not path.is_file():
            continue
        try:
            if suffix == ".npy":
                points = np.asarray(load_npy(path), np.float64)
            else:
                text = path.read_text(encoding="utf-8").replace(",", " ")
                points = np.loadtxt(text.splitlines(), dtype=np.float64, ndmin=2)
        except (ValueError, UnicodeDecodeError) as error:
            raise FlameFileError(f"{path}: cannot read landmarks ({error})") from error
        if points.shape != (68, 2) or not np.all(np.isfinite(points)):
            raise FlameFileError(f"{path}: expected finite (68, 2) landmarks in pixels of the "
                                 f"stored image, got shape {points.shape}")
        return points.astype(np.float32)
    return None


def _save_points(path: pathlib.Path, points: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: np.save(handle, points, allow_pickle=False))


def _read_failures(path: pathlib.Path) -> Dict[str, str]:
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text(encoding="utf-8")).get("failures", [])
        return {entry["image"]: entry["reason"] for entry in entries}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}  # only the reasons of earlier runs are lost; the empty files stay the record


def _write_failures(folder: pathlib.Path, report: DatasetReport, source: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    entries = [{"image": image, "reason": report.failures[image]}
               for image in sorted(report.failures)]
    atomic_write(folder / FAILURES_FILE, json.dumps(
        {"dataset": report.name, "source": source, "images": report.total,
         "failed": len(entries), "failures": entries}, indent=2) + "\n")


def _dataset_images(root: pathlib.Path, name: str, lists: pathlib.Path) -> List[str]:
    if not (root / name).is_dir():
        raise PrepareError(f"{root / name}: dataset folder {name!r} does not exist")
    table_path = lists / f"{name}.npy"
    if not table_path.is_file():
        raise PrepareError(f"{table_path}: no image list for dataset {name!r} (MICA keeps them "
                           f"in datasets/image_paths/; point --image-paths-dir there)")
    try:
        table = mica._actor_table(table_path)
    except (FlameFileError, FlameFileNotFoundError) as error:
        raise PrepareError(str(error)) from error
    return [image for actor in sorted(table) for image in table[actor][0]]


def prepare(root, names: Sequence[str], *, image_paths_dir=None, from_landmarks=None,
            detector=None, show_progress: bool = True) -> List[DatasetReport]:
    """Store the landmarks of every listed image of `names` (see the module docstring).

    from_landmarks: a folder (or a pattern with `{name}`) of the dataset's own landmark files;
      None detects them with `detector` (a `FaceDetector`, made here when None).
    Returns one `DatasetReport` per name. Raises PrepareError for a missing root, dataset
    folder or image list (before anything is written), and `PhotoExtraMissing` when detection
    needs mediapipe and it is absent.
    """
    from tqdm.auto import tqdm

    root = pathlib.Path(root)
    if not root.is_dir():
        raise PrepareError(f"{root}: MICA dataset root does not exist")
    if not names:
        raise PrepareError("no dataset names given")
    lists = pathlib.Path(image_paths_dir) if image_paths_dir else root / "image_paths"
    images = {name: _dataset_images(root, name, lists) for name in names}
    todo = sum(not mica.landmark_path(root, name, image).is_file()
               for name in names for image in images[name])
    own_detector = None
    if from_landmarks is None and detector is None and todo:
        from recon.image.detect import FaceDetector

        detector = own_detector = FaceDetector()
    source = "from_landmarks" if from_landmarks is not None else "detected"
    reports = []
    try:
        with tqdm(total=sum(map(len, images.values())), desc="landmarks", unit="image",
                  disable=not show_progress) as bar:
            for name in names:
                folder = root / name / mica.LANDMARK_FOLDER
                report = DatasetReport(name=name, total=len(images[name]))
                earlier = _read_failures(folder / FAILURES_FILE)
                provided = None if from_landmarks is None else pathlib.Path(
                    str(from_landmarks).replace("{name}", name))
                for relative in images[name]:
                    target = mica.landmark_path(root, name, relative)
                    if target.is_file():
                        report.skipped += 1
                        if mica.read_landmarks(target) is None:
                            report.failures[relative] = earlier.get(relative, "no face found")
                    else:
                        points, reason = _landmarks_of(root, name, relative, provided, detector)
                        _save_points(target, points if points is not None
                                     else np.zeros((0, 2), np.float32))
                        report.written += 1
                        if points is None:
                            report.failures[relative] = reason
                    bar.update(1)
                    bar.set_postfix(failed=sum(len(r.failures) for r in reports)
                                    + len(report.failures))
                _write_failures(folder, report, source)
                reports.append(report)
    finally:
        if own_detector is not None:
            own_detector.close()
    return reports


def _landmarks_of(root: pathlib.Path, name: str, relative: str,
                  provided: Optional[pathlib.Path], detector):
    """(points or None, reason when None) of one image."""
    if provided is not None:
        points = read_landmark_file(provided, relative)
        if points is None:
            stem = provided / pathlib.PurePosixPath(relative).with_suffix("")
            return None, f"no landmark file {stem}.npy or .txt"
        return points, ""
    path = root / name / mica.IMAGE_FOLDER / relative
    try:
        image = read_image(path)
    except ImageReadError as error:
        return None, f"unreadable image: {error}"
    points = detect_landmarks(detector, image)
    return (points, "") if points is not None else (None, "no face found")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recon.data.prepare_mica",
        description="Store the 68 landmarks of every image of MICA-format datasets "
                    "(ROOT/NAME/landmarks_68/), detected once with MediaPipe or converted from "
                    "the dataset's own landmark files. Resumable; exit status 1 when some "
                    "images have none (ROOT/NAME/landmarks_68/failures.json).")
    parser.add_argument("root", help="the MICA datasets root (holding NAME/arcface_input/...)")
    parser.add_argument("names", nargs="+", metavar="NAME", help="dataset folder names")
    parser.add_argument("--image-paths-dir", default=None,
                        help="folder of NAME.npy image lists (default ROOT/image_paths)")
    parser.add_argument("--from-landmarks", default=None, metavar="DIR",
                        help="convert the dataset's landmark files DIR/<image path without "
                             "suffix>.npy|.txt ((68, 2) pixels) instead of detecting; '{name}' "
                             "in DIR is replaced by each NAME")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        reports = prepare(args.root, args.names, image_paths_dir=args.image_paths_dir,
                          from_landmarks=args.from_landmarks, show_progress=not args.quiet)
    except (PrepareError, FlameFileError, PhotoExtraMissing) as error:
        print(f"prepare_mica: error: {error}", file=sys.stderr)
        return 2
    failed = 0
    for report in reports:
        failed += len(report.failures)
        print(f"{report.name}: {report.total} images, {report.written} written, "
              f"{report.skipped} already there, {len(report.failures)} without landmarks "
              f"(listed in {pathlib.Path(args.root) / report.failures_path})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
