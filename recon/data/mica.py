"""Reader for datasets packed in MICA's layout (Zielonka et al. 2022), as a grain source.

Layout (checked against MICA's public code: `datasets/base.py`, `datasets/creation/generator.py`,
`datasets/creation/util.py`, and its shipped `datasets/image_paths/FLORENCE.npy`):

    <root>/<NAME>/FLAME_parameters/<actor>/<file>.npz   keys `betas` ((400,): shape [:300],
                                                        expression [300:]) and `pose` ((15,)
                                                        FLAME 2020 full pose: global [:3],
                                                        jaw [6:9])
    <root>/<NAME>/registrations/<actor>/<file>.obj      FLAME-topology registration (not read)
    <root>/<NAME>/arcface_input/<actor>/<image>.jpg     224 x 224 crop, insightface `norm_crop`
                                                        (5-point ArcFace alignment at 224)
    <root>/<NAME>/arcface_input/<actor>/<image>.npy     (3, 112, 112) float32 ArcFace blob:
                                                        RGB, (pixel - 127.5) / 127.5
    <image_paths>/<NAME>.npy    pickled dict {actor: ([image paths], npz path)}, paths relative
                                to arcface_input/ and FLAME_parameters/, e.g.
                                {'subject_01': (['subject_01/frame_2300.jpg', ...],
                                                'subject_01/110920150452.npz')}

MICA keeps `image_paths/` beside its code (`datasets/image_paths/`); here it defaults to
`<root>/image_paths/` and `image_paths_dir=` points elsewhere. The `.npy` is read through the
restricted unpickler (`flame_jax.safe_pickle.load_npy`), never `np.load(allow_pickle=True)`.
MICA's ground truth is the neutral FLAME mesh of `betas[:300]` (zero expression and pose), which
is what `vertices` holds (`betas[300:]` and `pose` describe the scan, not the photos).

The crop: MICA's images are insightface `norm_crop` crops, i.e. `recon.image.CropSpec(anchor=
"arcface_five_points", size=224)`; a run whose crop is another window is refused (its size may
differ: the images are resized, `recon.image.preprocess.resize`). The 68 landmarks of the 2D
losses (`landmarks="detected"`) are the photo detector's, found once by
`python -m recon.data.prepare_mica ROOT NAME...` and stored beside the images as
`<root>/<NAME>/landmarks_68/<image path>.npy` ((68, 2) float32 pixels of the stored image);
an image where no face was found has none (its landmark weights are 0). Skin masks are zero
(the objective then uses the rendered face region).
"""

from __future__ import annotations

import pathlib
import re
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import jax
import numpy as np

import flame_jax
from flame_jax.errors import FlameFileError, FlameFileNotFoundError
from flame_jax.fileio import read_npz
from flame_jax.safe_pickle import load_npy
from recon.data.synthetic import PicklableModel
from recon.image import crop as crop_lib
from recon.image import preprocess
from recon.image.io import ImageReadError, read_image

IMAGE_FOLDER = "arcface_input"
FLAME_FOLDER = "FLAME_parameters"
REGISTRATION_FOLDER = "registrations"
LANDMARK_FOLDER = "landmarks_68"
NUM_SHAPE = 300
BLOB_SIZE = 112
# What MICA's `arcface_input` images are: insightface's norm_crop at 224.
MICA_CROP = crop_lib.CropSpec(anchor="arcface_five_points", size=224)  # MICA: betas[:300] is the identity, betas[300:] the expression


def _actor_table(path: pathlib.Path) -> Dict[str, Tuple[List[str], str]]:
    """Read and validate one `image_paths/NAME.npy`."""
    table = load_npy(path)
    if not isinstance(table, dict) or not table:
        raise FlameFileError(f"{path}: expected a non-empty dict {{actor: (image paths, npz "
                             f"path)}}, got {type(table).__name__}")
    out = {}
    for actor, entry in table.items():
        if (not isinstance(entry, (tuple, list)) or len(entry) != 2
                or not isinstance(entry[1], str) or not isinstance(entry[0], (list, tuple))
                or not entry[0] or not all(isinstance(p, str) for p in entry[0])):
            raise FlameFileError(f"{path}: actor {actor!r}: expected ([image paths], npz path), "
                                 f"got {entry!r:.200}")
        out[str(actor)] = (list(entry[0]), entry[1])
    return out


def _read_image(path: pathlib.Path) -> np.ndarray:
    """Image file -> (H, W, 3) float32 RGB in [0, 1] (`recon.image.read_image`)."""
    if not path.is_file():
        raise FlameFileNotFoundError(f"{path}: no such image file")
    try:
        return read_image(path).astype(np.float32) / np.float32(255.0)
    except ImageReadError as error:
        raise FlameFileError(str(error)) from error


def _read_blob(path: pathlib.Path) -> np.ndarray:
    """MICA's ArcFace blob (3, 112, 112) -> (112, 112, 3) float32."""
    blob = np.asarray(load_npy(path))
    if blob.shape == (1, 3, BLOB_SIZE, BLOB_SIZE):
        blob = blob[0]
    if blob.shape != (3, BLOB_SIZE, BLOB_SIZE) or not np.all(np.isfinite(blob)):
        raise FlameFileError(f"{path}: expected a finite (3, 112, 112) ArcFace blob, got shape "
                             f"{blob.shape}")
    return np.ascontiguousarray(blob.transpose(1, 2, 0), np.float32)


def landmark_path(root: pathlib.Path, name: str, relative: str) -> pathlib.Path:
    """Where the detected landmarks of image `relative` of dataset `name` are stored."""
    return pathlib.Path(root) / name / LANDMARK_FOLDER / (relative + ".npy")


def read_landmarks(path: pathlib.Path) -> Optional[np.ndarray]:
    """(68, 2) float32 detected landmarks, or None when the file records "no face" (an empty
    array); errors name the file."""
    if not path.is_file():
        raise FlameFileNotFoundError(
            f"{path}: no detected landmarks; run `python -m recon.data.prepare_mica ROOT NAME` "
            f"once (or set data.mica_landmarks='none' and switch the landmark terms off)")
    points = np.asarray(load_npy(path))
    if points.size == 0:
        return None
    if points.shape != (68, 2) or not np.all(np.isfinite(points)):
        raise FlameFileError(f"{path}: expected finite (68, 2) landmarks, got {points.shape}")
    return points.astype(np.float32)


def read_flame_parameters(path: pathlib.Path) -> Tuple[np.ndarray, np.ndarray]:
    """MICA `.npz` -> (shape (300,), pose (15,) or as stored) float32; errors name the path."""
    if not path.is_file():
        raise FlameFileNotFoundError(f"{path}: no such FLAME parameter file")
    arrays = read_npz(path)
    for key in ("betas", "pose"):
        if key not in arrays:
            raise FlameFileError(f"{path}: missing key {key!r} (keys: {sorted(arrays)})")
    betas = np.asarray(arrays["betas"], np.float32).reshape(-1)
    pose = np.asarray(arrays["pose"], np.float32).reshape(-1)
    if betas.size == 0 or pose.size < 9:
        raise FlameFileError(f"{path}: betas {arrays['betas'].shape} / pose "
                             f"{arrays['pose'].shape}: expected betas (>= 1,) and pose (>= 9,)")
    if not (np.all(np.isfinite(betas)) and np.all(np.isfinite(pose))):
        raise FlameFileError(f"{path}: betas or pose hold NaN or inf")
    return betas[:NUM_SHAPE], pose


@jax.jit
def _neutral_vertices(model: flame_jax.FlameModel, shape: jax.Array) -> jax.Array:
    params = flame_jax.FlameParams.zeros(shape.shape[0], model).replace(shape=shape)
    return flame_jax.forward(model, params).vertices


class MicaDataset:
    """Grain source over MICA-format datasets: record = one actor with K images.

    Args:
      root: folder holding `<NAME>/FLAME_parameters`, `<NAME>/arcface_input`, ...
      names: dataset folder names, e.g. ("FACEWAREHOUSE", "LYHM", "STIRLING", "FLORENCE").
      model: the FLAME model that turns `betas` into the neutral mesh (FLAME 2020 for MICA's
        files; shape coefficients beyond `model.num_shape` are dropped, as FLAME's loaders do).
      images_per_subject: K images drawn per record, without replacement (with replacement
        when an actor has fewer than K images).
      seed: fixes which images each record draws.
      repeats: the source holds `repeats` records per actor (record key = draw * actors +
        actor), so that an epoch can draw each actor's images `repeats` different ways.
      image_paths_dir: folder of `NAME.npy` (default `<root>/image_paths`).
      crop: the run's crop; must be `MICA_CROP`'s window (any size).
      image_size: the 2D losses' image side (the stored crops are resized to it).
      backbone_kind: `recon.image.backbone_input` kind of `backbone_inputs`.
      landmarks: "detected" (read `landmarks_68/`, see the module docstring) or "none".
      use_arcface_blobs: take `backbone_inputs` from MICA's `.npy` ArcFace blob when it exists
        (backbone_kind "arcface" only; else from the image).
    Subject ids are the actors' positions in the sorted (NAME, actor) list.
    Missing folders/lists raise `FlameFileNotFoundError` at construction; a missing image or
    parameter file raises it when its record is read, naming the path.
    """

    def __init__(self, root, names: Sequence[str], *, model: flame_jax.FlameModel,
                 images_per_subject: int = 2, seed: int = 0, repeats: int = 1,
                 image_paths_dir=None, crop: crop_lib.CropSpec = MICA_CROP,
                 image_size: int = 224, backbone_kind: str = "arcface",
                 landmarks: str = "detected", use_arcface_blobs: bool = True):
        self.root = pathlib.Path(root)
        if isinstance(names, str):
            names = (names,)
        if not names:
            raise ValueError("MicaDataset: names is empty")
        if images_per_subject < 1 or repeats < 1:
            raise ValueError(f"images_per_subject ({images_per_subject}) and repeats ({repeats}) "
                             f"must be >= 1")
        if not self.root.is_dir():
            raise FlameFileNotFoundError(f"{self.root}: MICA dataset root does not exist")
        if crop.resized(MICA_CROP.size) != MICA_CROP:
            raise ValueError(f"MICA-format images are insightface norm_crop crops ({MICA_CROP}); "
                             f"the run's crop {crop} is another window: set data.crop.anchor="
                             f"'arcface_five_points'")
        if backbone_kind not in preprocess.BACKBONE_INPUT_SIZE:
            raise ValueError(f"backbone_kind must be one of "
                             f"{sorted(preprocess.BACKBONE_INPUT_SIZE)}, got {backbone_kind!r}")
        if landmarks not in ("detected", "none"):
            raise ValueError(f"landmarks must be 'detected' or 'none', got {landmarks!r}")
        lists = pathlib.Path(image_paths_dir) if image_paths_dir else self.root / "image_paths"
        self.actors: List[Tuple[str, str, List[str], str]] = []
        for name in sorted(names):
            folder = self.root / name
            if not folder.is_dir():
                raise FlameFileNotFoundError(f"{folder}: dataset folder {name!r} does not exist")
            table = _actor_table(lists / f"{name}.npy")
            for actor in sorted(table):
                images, params = table[actor]
                self.actors.append((name, actor, images, params))
        self.images_per_subject = int(images_per_subject)
        self.seed = int(seed)
        self.repeats = int(repeats)
        self.image_size = int(image_size)
        self.backbone_kind = backbone_kind
        self.landmarks = landmarks
        self.use_arcface_blobs = bool(use_arcface_blobs) and backbone_kind == "arcface"
        self._model = PicklableModel(model)
        self._num_shape = model.num_shape

    def __len__(self) -> int:
        return len(self.actors) * self.repeats

    def image_path(self, name: str, relative: str) -> pathlib.Path:
        return self.root / name / IMAGE_FOLDER / relative

    def parameter_path(self, name: str, relative: str) -> pathlib.Path:
        return self.root / name / FLAME_FOLDER / relative

    def neutral_vertices(self, actor_index: int) -> np.ndarray:
        """(V, 3) float32 metres: FLAME(betas[:300]) with zero expression and pose."""
        name, _, _, params = self.actors[actor_index]
        shape, _ = read_flame_parameters(self.parameter_path(name, params))
        shape = np.pad(shape, (0, max(self._num_shape - shape.size, 0)))[:self._num_shape]
        return np.asarray(_neutral_vertices(self._model.get(), shape[None]))[0]

    def __getitem__(self, record_key: int) -> Dict[str, np.ndarray]:
        record_key = int(record_key)
        if not 0 <= record_key < len(self):
            raise IndexError(f"record {record_key} outside [0, {len(self)})")
        draw, actor_index = divmod(record_key, len(self.actors))
        name, _, images_list, _ = self.actors[actor_index]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, actor_index, draw]))
        chosen = rng.choice(len(images_list), size=self.images_per_subject,
                            replace=len(images_list) < self.images_per_subject)
        vertices = self.neutral_vertices(actor_index)
        k, size = self.images_per_subject, self.image_size
        images, inputs = [], []
        points = np.zeros((k, 68, 2), np.float32)
        weights = np.zeros((k, 68), np.float32)
        for row, index in enumerate(chosen):
            path = self.image_path(name, images_list[index])
            image = _read_image(path)
            blob = pathlib.Path(re.sub(r"png|jpg", "npy", str(path)))  # MICA's own rule
            if self.use_arcface_blobs and blob != path and blob.is_file():
                inputs.append(_read_blob(blob))
            else:
                inputs.append(preprocess.backbone_input(image[None], self.backbone_kind)[0])
            if self.landmarks == "detected":
                found = read_landmarks(landmark_path(self.root, name, images_list[index]))
                if found is not None:
                    scaled = found * np.float32(size / image.shape[1])
                    points[row] = scaled
                    weights[row] = np.all((scaled >= 0) & (scaled < size), -1)
            images.append(preprocess.resize(image[None], size)[0] if image.shape[:2] != (
                size, size) else image)
        return dict(
            images=np.clip(np.stack(images), 0.0, 1.0).astype(np.float32),
            backbone_inputs=np.stack(inputs).astype(np.float32),
            landmarks=points,
            landmark_weights=weights,
            skin_masks=np.zeros((k, size, size), np.float32),
            vertices=np.repeat(vertices[None], k, 0),
            has_3d=np.ones((k,), np.float32),
            subject_ids=np.full((k,), actor_index, np.int32))

    def __repr__(self) -> str:
        return (f"MicaDataset(root={str(self.root)!r}, actors={len(self.actors)}, "
                f"images_per_subject={self.images_per_subject}, repeats={self.repeats})")


def write_tiny_tree(root, model: flame_jax.FlameModel, *, name: str = "TINY", actors: int = 3,
                    images_per_actor: int = 3, seed: int = 0, blobs: bool = True,
                    landmarks: bool = True, no_face: Sequence[str] = ()
                    ) -> Dict[str, np.ndarray]:
    """Write a small dataset in MICA's layout (for tests and examples); returns {actor: shape
    coefficients (300,)}. Images are random-noise JPEGs with a solid square per actor.

    landmarks: also write `landmarks_68/` as `python -m recon.data.prepare_mica` does: 68
      random points inside the square ((68, 2) float32 pixels) per image, or an empty array
      ("no face found") for the image paths listed in `no_face` (e.g. "actor_00/image_001.jpg").
    """
    root = pathlib.Path(root)
    rng = np.random.default_rng(seed)
    table, shapes = {}, {}
    for a in range(actors):
        actor = f"actor_{a:02d}"
        betas = rng.normal(0.0, 1.0, 400).astype(np.float32)
        pose = np.zeros(15, np.float32)
        npz = f"{actor}/params.npz"
        (root / name / FLAME_FOLDER / actor).mkdir(parents=True, exist_ok=True)
        np.savez(root / name / FLAME_FOLDER / npz, betas=betas, pose=pose)
        (root / name / REGISTRATION_FOLDER / actor).mkdir(parents=True, exist_ok=True)
        flame_jax.fileio.write_mesh(root / name / REGISTRATION_FOLDER / actor / "mesh.obj",
                                    np.asarray(model.v_template), np.asarray(model.faces))
        images = []
        for i in range(images_per_actor):
            relative = f"{actor}/image_{i:03d}.jpg"
            path = root / name / IMAGE_FOLDER / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
            pixels[80:140, 80:140] = (40 * a, 100, 200 - 40 * i)
            cv2.imwrite(str(path), pixels)
            if landmarks:
                points = (np.zeros((0, 2)) if relative in no_face else  # own stream
                          np.random.default_rng([seed, a, i]).uniform(80.0, 140.0, (68, 2)))
                target = landmark_path(root, name, relative)
                target.parent.mkdir(parents=True, exist_ok=True)
                np.save(target, points.astype(np.float32))
            if blobs:
                rgb = cv2.cvtColor(cv2.resize(pixels, (112, 112), interpolation=cv2.INTER_AREA),
                                   cv2.COLOR_BGR2RGB)
                np.save(str(path)[:-4] + ".npy",
                        ((rgb.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1))
            images.append(relative)
        table[actor] = (images, npz)
        shapes[actor] = betas[:NUM_SHAPE]
    (root / "image_paths").mkdir(parents=True, exist_ok=True)
    array = np.empty((), dtype=object)
    array[()] = table
    np.save(root / "image_paths" / f"{name}.npy", array, allow_pickle=True)
    return shapes
