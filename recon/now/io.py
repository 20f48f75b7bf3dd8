"""Readers and writers for the NoW layout (numpy, and trimesh for meshes; nothing runs on JAX).

Layout (`<root>` = the NoW download):
  <root>/imagepathsvalidation.txt, <root>/imagepathstest.txt   lines `subject/challenge/image.jpg`
  <root>/scans/<subject>/*.obj                                 one scan per subject, millimetres
  <root>/scans_lmks_onlypp/<subject>/*.pp                      MeshLab picked points, 7 points
  <root>/NoW_Dataset/final_release_version/iphone_pictures/<subject>/<challenge>/<image>.jpg
  <root>/NoW_Dataset/final_release_version/detected_face/<subject>/<challenge>/<image>.npy
Predictions: <dir>/<subject>/<challenge>/<image>.obj|.ply and <image>.npy (7x3 or 1x7x3) or .txt.

Every reader raises `NowFileError` naming the path and the problem.
"""

from __future__ import annotations

import dataclasses
import io as _io
import os
import pathlib
import xml.etree.ElementTree as ET
from typing import Optional, Sequence, Union

import numpy as np

from flame_jax import fileio
from flame_jax.safe_pickle import load_npy

PathLike = Union[str, os.PathLike]

CHALLENGES = ("multiview_neutral", "multiview_expressions", "multiview_occlusions", "selfie")
SPLIT_LISTS = {"val": "imagepathsvalidation.txt", "test": "imagepathstest.txt"}
RELEASE_DIR = pathlib.Path("NoW_Dataset") / "final_release_version"
IMAGES_DIR = RELEASE_DIR / "iphone_pictures"
FACE_BOXES_DIR = RELEASE_DIR / "detected_face"
FACE_BOX_KEYS = ("left", "right", "top", "bottom")
CACHE_ENV = "FACERECON_CACHE_DIR"


class NowFileError(ValueError):
    """A NoW file is missing, malformed or inconsistent; the message names the path."""


class NowMissingError(NowFileError):
    """Predictions are missing; `.missing` lists every missing entry (`subject/challenge/image`)."""

    def __init__(self, message: str, missing: Sequence[str]):
        super().__init__(message)
        self.missing = list(missing)


@dataclasses.dataclass(frozen=True)
class ImageEntry:
    """One line of an image list: `subject/challenge/image.jpg`."""

    subject: str
    challenge: str
    image: str  # file name with extension, e.g. IMG_0001.jpg

    @property
    def key(self) -> str:
        return f"{self.subject}/{self.challenge}/{self.image}"

    @property
    def stem(self) -> str:
        return os.path.splitext(self.image)[0]

    def relative(self, suffix: str) -> pathlib.Path:
        """`subject/challenge/<stem><suffix>`."""
        return pathlib.Path(self.subject, self.challenge, self.stem + suffix)


# ----------------------------------------------------------------------------- image lists

def read_image_list(path: PathLike) -> list[ImageEntry]:
    """Entries of `imagepaths*.txt`; blank lines skipped; the last three path parts are used."""
    path = pathlib.Path(path)
    text = _read_text(path)
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        parts = line.replace("\\", "/").split("/")
        if len(parts) < 3 or not all(parts[-3:]):
            raise NowFileError(f"{path}:{number}: expected 'subject/challenge/image.jpg', "
                               f"got {line!r}")
        subject, challenge, image = parts[-3:]
        if challenge not in CHALLENGES:
            raise NowFileError(f"{path}:{number}: unknown challenge {challenge!r} (expected one "
                               f"of {', '.join(CHALLENGES)})")
        entries.append(ImageEntry(subject, challenge, image))
    if not entries:
        raise NowFileError(f"{path}: the image list is empty")
    return entries


def write_image_list(path: PathLike, entries: Sequence[ImageEntry]) -> None:
    write_file(path, "".join(entry.key + "\n" for entry in entries))


def image_list_path(root: PathLike, split: str) -> pathlib.Path:
    if split not in SPLIT_LISTS:
        raise ValueError(f"split must be one of {sorted(SPLIT_LISTS)}, got {split!r}")
    return pathlib.Path(root) / SPLIT_LISTS[split]


# ----------------------------------------------------------------------------- .pp landmarks

def read_pp(path: PathLike) -> np.ndarray:
    """(7, 3) float64 scan landmarks (mm) from a MeshLab picked-points file, in file order.

    Parsed as XML (`<point x= y= z= .../>` elements); the official reader takes lines 9-15 of
    the file, which are these elements in MeshLab's output. Points with active="0" count too, as
    in the official reader.
    """
    path = pathlib.Path(path)
    text = _read_text(path)
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise NowFileError(f"{path}: not a MeshLab picked-points XML file ({exc})") from exc
    points = []
    for element in root.iter("point"):
        try:
            points.append([float(element.attrib[axis]) for axis in "xyz"])
        except KeyError as exc:
            raise NowFileError(f"{path}: <point> element without attribute {exc}") from exc
        except ValueError as exc:
            raise NowFileError(f"{path}: <point> coordinate is not a number ({exc})") from exc
    if len(points) != 7:
        raise NowFileError(f"{path}: expected 7 <point> elements, found {len(points)}")
    points = np.asarray(points, np.float64)
    if not np.all(np.isfinite(points)):
        raise NowFileError(f"{path}: landmark coordinates hold NaN or infinite values")
    return points


def write_pp(path: PathLike, landmarks: np.ndarray, *, names: Optional[Sequence[str]] = None,
             model_file: str = "scan.obj") -> None:
    """Write (7, 3) landmarks as MeshLab picked points (the header MeshLab writes, 8 lines)."""
    landmarks = np.asarray(landmarks, np.float64)
    if landmarks.shape != (7, 3):
        raise ValueError(f"landmarks must be (7, 3), got {landmarks.shape}")
    names = names or [str(i) for i in range(7)]
    lines = ['<!DOCTYPE PickedPoints>', '<PickedPoints>', ' <DocumentData>',
             '  <DateTime time="00:00:00" date="2020-01-01"/>', '  <User name="facerecon_jax"/>',
             f'  <DataFileName name="{model_file}"/>', '  <templateName name=""/>',
             ' </DocumentData>']
    lines += [f' <point x="{x:.6f}" y="{y:.6f}" z="{z:.6f}" name="{name}" active="1"/>'
              for (x, y, z), name in zip(landmarks, names)]
    lines.append('</PickedPoints>')
    write_file(path, "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- scans and meshes

# Meshes go through `flame_jax.fileio` (trimesh). Measured before the hand-written regex OBJ
# reader was dropped, on a 100k-vertex, 87k-triangle synthetic scan (5.8 MB; written by
# `synthetic.build_synthetic_split(root, SyntheticNowConfig(num_val_subjects=1,
# num_test_subjects=0, subdivisions=3, max_scan_vertices=100_000), with_images=False)`) and a
# 5023-vertex FLAME prediction: best of 5 `time.perf_counter()` calls of `read_obj` from
# `git show c1bea30:recon/now/io.py` and of `flame_jax.fileio.read_mesh`, 2 shared CPUs:
#   scan:       own reader (vertices only) 182 ms, trimesh 319 ms (own reader with faces 458 ms)
#   prediction: own reader 32 ms, trimesh 25 ms;  `protocol.score_prediction`: 860 ms / image
# (a rerun under heavier load: 269 / 477 / 620 ms and 43 / 34 ms, the same ratios).
# A worker parses a subject's scan once (`scoring._load_scan`) for ~20 predictions, so trimesh
# costs ~+7 ms per image on the scan and saves ~7-9 ms on the prediction: not slower for the
# scorer, and one mesh reader fewer. `python benchmarks/now_scorer.py` prints the scan read time.


def read_mesh(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(vertices (V, 3) float64, faces (F, 3) int64) of a triangle mesh (.obj, .ply, ...), in
    file order (`flame_jax.fileio.read_mesh`); NowFileError naming the path otherwise."""
    path = pathlib.Path(path)
    try:
        vertices, faces = fileio.read_mesh(path)
    except FileNotFoundError as exc:
        raise NowFileError(f"{path}: file not found") from exc
    except ValueError as exc:  # FlameFileError names the path and the problem
        raise NowFileError(str(exc)) from exc
    return vertices.astype(np.float64), faces.astype(np.int64)


def write_mesh(path: PathLike, vertices: np.ndarray, faces: np.ndarray) -> None:
    """`flame_jax.fileio.write_mesh` (atomic; format by suffix), creating the folder."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fileio.write_mesh(path, np.asarray(vertices, np.float64), np.asarray(faces, np.int64))


def find_scan(root: PathLike, subject: str) -> tuple[pathlib.Path, pathlib.Path]:
    """(scan .obj, landmarks .pp) of a subject; exactly one of each is expected."""
    root = pathlib.Path(root)
    found = []
    for folder, pattern in (("scans", "*.obj"), ("scans_lmks_onlypp", "*.pp")):
        matches = sorted((root / folder / subject).glob(pattern))
        if len(matches) != 1:
            raise NowFileError(f"{root / folder / subject}: expected one {pattern} file, "
                               f"found {len(matches)}")
        found.append(matches[0])
    return found[0], found[1]


# ----------------------------------------------------------------------------- face boxes

def read_face_box(path: PathLike) -> dict:
    """{'left', 'right', 'top', 'bottom'} floats (pixels) from a detected_face .npy.

    The file is a pickled dict inside a .npy; it goes through the project's restricted
    unpickler (numpy arrays and scalars only), never `np.load(allow_pickle=True)`.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise NowFileError(f"{path}: file not found")
    try:
        data = load_npy(path)
    except ValueError as exc:  # FlameFileError is a ValueError
        raise NowFileError(f"{path}: cannot read the face box ({exc})") from exc
    if not isinstance(data, dict):
        raise NowFileError(f"{path}: expected a pickled dict with keys {FACE_BOX_KEYS}, got "
                           f"{type(data).__name__}")
    missing = [key for key in FACE_BOX_KEYS if key not in data]
    if missing:
        raise NowFileError(f"{path}: face box dict lacks keys {missing} (has {sorted(map(str, data))})")
    try:
        box = {key: float(np.asarray(data[key]).reshape(())) for key in FACE_BOX_KEYS}
    except (TypeError, ValueError) as exc:
        raise NowFileError(f"{path}: face box values must be scalars ({exc})") from exc
    if not all(np.isfinite(list(box.values()))):
        raise NowFileError(f"{path}: face box holds NaN or infinite values: {box}")
    if box["right"] <= box["left"] or box["bottom"] <= box["top"]:
        raise NowFileError(f"{path}: empty face box {box}")
    return box


def face_box_array(box: dict) -> np.ndarray:
    """(4,) float64 [left, top, right, bottom] (`recon.image.crop`'s [x0, y0, x1, y1]) of a
    face-box dict."""
    return np.array([box["left"], box["top"], box["right"], box["bottom"]], np.float64)


def write_face_box(path: PathLike, box: dict) -> None:
    """Write a detected_face .npy as the NoW release does: np.save of a dict (pickled)."""
    array = np.empty((), dtype=object)
    array[()] = {key: float(box[key]) for key in FACE_BOX_KEYS}
    # Writing our own dict; reading is restricted.
    write_file(path, lambda handle: np.save(handle, array, allow_pickle=True))


# ----------------------------------------------------------------------------- predictions

def prediction_paths(folder: PathLike, entry: ImageEntry
                     ) -> tuple[Optional[pathlib.Path], Optional[pathlib.Path]]:
    """(mesh path or None, landmarks path or None): .obj before .ply, .npy before .txt."""
    folder = pathlib.Path(folder)
    found = []
    for suffixes in ((".obj", ".ply"), (".npy", ".txt")):
        candidates = [folder / entry.relative(suffix) for suffix in suffixes]
        found.append(next((c for c in candidates if c.is_file()), None))
    return found[0], found[1]


def read_prediction_landmarks(path: PathLike) -> np.ndarray:
    """(7, 3) float64 predicted landmarks from .npy (7x3 or 1x7x3, plain array) or .txt."""
    path = pathlib.Path(path)
    if path.suffix.lower() == ".npy":
        try:
            with open(path, "rb") as handle:
                landmarks = np.load(handle, allow_pickle=False)
        except FileNotFoundError as exc:
            raise NowFileError(f"{path}: file not found") from exc
        except ValueError as exc:
            raise NowFileError(f"{path}: not a plain numeric .npy array ({exc})") from exc
        except (OSError, EOFError) as exc:
            raise NowFileError(f"{path}: truncated or corrupt .npy ({exc})") from exc
    elif path.suffix.lower() == ".txt":
        try:
            landmarks = np.loadtxt(_io.StringIO(_read_text(path)), dtype=np.float64, ndmin=2)
        except ValueError as exc:
            raise NowFileError(f"{path}: landmarks text is not a 7 x 3 table of numbers ({exc})") from exc
    else:
        raise NowFileError(f"{path}: landmarks must be .npy or .txt")
    try:
        landmarks = np.asarray(landmarks, np.float64)
    except (TypeError, ValueError) as exc:
        raise NowFileError(f"{path}: landmarks are not numeric ({exc})") from exc
    if landmarks.shape == (1, 7, 3):
        landmarks = landmarks[0]
    if landmarks.shape != (7, 3):
        raise NowFileError(f"{path}: landmarks must be 7 x 3 (or 1 x 7 x 3), got shape "
                           f"{landmarks.shape}")
    if not np.all(np.isfinite(landmarks)):
        raise NowFileError(f"{path}: landmarks hold NaN or infinite values")
    return landmarks


def write_prediction(folder: PathLike, entry: ImageEntry, vertices: np.ndarray, faces: np.ndarray,
                     landmarks: np.ndarray) -> None:
    """Write `<folder>/<subject>/<challenge>/<stem>.obj` and `.npy` (7x3 float32)."""
    folder = pathlib.Path(folder)
    landmarks = np.asarray(landmarks, np.float32)
    if landmarks.shape != (7, 3):
        raise ValueError(f"landmarks must be (7, 3), got {landmarks.shape}")
    write_mesh(folder / entry.relative(".obj"), vertices, faces)
    write_file(folder / entry.relative(".npy"),
               lambda handle: np.save(handle, landmarks, allow_pickle=False))


def missing_predictions(folder: PathLike, entries: Sequence[ImageEntry]) -> dict[str, str]:
    """{entry key: what is missing} for every entry lacking a mesh or landmarks, all at once."""
    missing = {}
    for entry in entries:
        mesh, landmarks = prediction_paths(folder, entry)
        lacking = [name for name, path in (("mesh .obj/.ply", mesh),
                                           ("landmarks .npy/.txt", landmarks)) if path is None]
        if lacking:
            missing[entry.key] = "no " + " and no ".join(lacking)
    return missing


# ----------------------------------------------------------------------------- file helpers

def cache_base() -> pathlib.Path:
    """$FACERECON_CACHE_DIR, else ~/.cache/facerecon_jax (the built split, detected landmarks)."""
    base = os.environ.get(CACHE_ENV)
    return pathlib.Path(base) if base else pathlib.Path.home() / ".cache" / "facerecon_jax"


def _read_bytes(path: pathlib.Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise NowFileError(f"{path}: file not found") from exc
    except IsADirectoryError as exc:
        raise NowFileError(f"{path}: is a directory, expected a file") from exc
    except OSError as exc:
        raise NowFileError(f"{path}: cannot read ({exc})") from exc


def _read_text(path: pathlib.Path) -> str:
    try:
        return _read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NowFileError(f"{path}: not UTF-8 text ({exc})") from exc


def write_file(path: PathLike, data) -> None:
    """`flame_jax.fileio.atomic_write` (bytes, str or a writer callable), creating the folder."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write(path, data)
