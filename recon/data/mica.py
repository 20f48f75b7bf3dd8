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
is what `vertices` holds; `betas[300:]` and `pose` describe the scan, not the photos, so
`posed_vertices` is a copy of `vertices`. Photos have no landmarks or skin masks here:
`landmark_weights` and `skin_masks` are zero (the objective then uses the rendered face region).
"""

from __future__ import annotations

import pathlib
import re
from typing import Dict, List, Sequence, Tuple

import cv2
import jax
import numpy as np

import flame_jax
from flame_jax.errors import FlameFileError, FlameFileNotFoundError
from flame_jax.fileio import read_npz
from flame_jax.safe_pickle import load_npy
from recon.backbone.preprocess import BACKBONE_SIZE, backbone_input_from_crop
from recon.data.synthetic import PicklableModel

IMAGE_FOLDER = "arcface_input"
FLAME_FOLDER = "FLAME_parameters"
REGISTRATION_FOLDER = "registrations"
NUM_SHAPE = 300  # MICA: betas[:300] is the identity, betas[300:] the expression


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


def _read_image(path: pathlib.Path, size: int) -> np.ndarray:
    """Image file -> (size, size, 3) float32 RGB in [0, 1]."""
    if not path.is_file():
        raise FlameFileNotFoundError(f"{path}: no such image file")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FlameFileError(f"{path}: cannot decode image")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
    if rgb.shape[:2] != (size, size):
        shrink = rgb.shape[0] > size or rgb.shape[1] > size
        rgb = cv2.resize(rgb, (size, size),
                         interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return rgb


def _read_blob(path: pathlib.Path) -> np.ndarray:
    """MICA's ArcFace blob (3, 112, 112) -> (112, 112, 3) float32."""
    blob = np.asarray(load_npy(path))
    if blob.shape == (1, 3, BACKBONE_SIZE, BACKBONE_SIZE):
        blob = blob[0]
    if blob.shape != (3, BACKBONE_SIZE, BACKBONE_SIZE) or not np.all(np.isfinite(blob)):
        raise FlameFileError(f"{path}: expected a finite (3, 112, 112) ArcFace blob, got shape "
                             f"{blob.shape}")
    return np.ascontiguousarray(blob.transpose(1, 2, 0), np.float32)


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
      image_size: the crop size (the 224 `norm_crop` images are resized only if they differ).
      use_arcface_blobs: take `backbone_images` from MICA's `.npy` blob when it exists
        (else from the crop, `recon.backbone.backbone_input_from_crop`).
    Subject ids are the actors' positions in the sorted (NAME, actor) list.
    Missing folders/lists raise `FlameFileNotFoundError` at construction; a missing image or
    parameter file raises it when its record is read, naming the path.
    """

    def __init__(self, root, names: Sequence[str], *, model: flame_jax.FlameModel,
                 images_per_subject: int = 2, seed: int = 0, repeats: int = 1,
                 image_paths_dir=None, image_size: int = 224, use_arcface_blobs: bool = True):
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
        self.use_arcface_blobs = bool(use_arcface_blobs)
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
        name, _, images, _ = self.actors[actor_index]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, actor_index, draw]))
        chosen = rng.choice(len(images), size=self.images_per_subject,
                            replace=len(images) < self.images_per_subject)
        vertices = self.neutral_vertices(actor_index)
        crops, inputs = [], []
        for index in chosen:
            path = self.image_path(name, images[index])
            crop = _read_image(path, self.image_size)
            blob = pathlib.Path(re.sub(r"png|jpg", "npy", str(path)))  # MICA's own rule
            if self.use_arcface_blobs and blob != path and blob.is_file():
                inputs.append(_read_blob(blob))
            else:
                inputs.append(backbone_input_from_crop(crop, max_value=1.0))
            crops.append(crop)
        k, size = self.images_per_subject, self.image_size
        return dict(
            images=np.stack(crops).astype(np.float32),
            backbone_images=np.stack(inputs).astype(np.float32),
            landmarks=np.zeros((k, 68, 2), np.float32),
            landmark_weights=np.zeros((k, 68), np.float32),
            skin_masks=np.zeros((k, size, size), np.float32),
            vertices=np.repeat(vertices[None], k, 0),
            posed_vertices=np.repeat(vertices[None], k, 0),
            has_3d=np.ones((k,), np.float32),
            subject_ids=np.full((k,), actor_index, np.int32))

    def __repr__(self) -> str:
        return (f"MicaDataset(root={str(self.root)!r}, actors={len(self.actors)}, "
                f"images_per_subject={self.images_per_subject}, repeats={self.repeats})")


def write_tiny_tree(root, model: flame_jax.FlameModel, *, name: str = "TINY", actors: int = 3,
                    images_per_actor: int = 3, seed: int = 0, blobs: bool = True
                    ) -> Dict[str, np.ndarray]:
    """Write a small dataset in MICA's layout (for tests and examples); returns {actor: shape
    coefficients (300,)}. Images are random-noise JPEGs with a solid square per actor."""
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
