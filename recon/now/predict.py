"""Predict NoW meshes with a trained regressor through the image contract (`recon.image`).

    predictor = recon.inference.load_predictor("runs/paper")
    report = predict_split(root, entries, predictor, "preds/")
      -> preds/<subject>/<challenge>/<image>.obj (neutral mesh, metres) + <image>.npy (7 x 3 m)
    write_mean_face(predictor.flame, entries, "mean_face/")   # the zero-skill reference

Each image is read with `recon.image.read_image` and cut with the predictor's own `CropSpec`
(`recon.image.crop_image`), so a model sees NoW faces as it saw its training faces:
  box anchor: NoW's detected-face box (`detected_face/.../<image>.npy`), the DECA/MICA crop.
  landmark anchors ("dlib_five_points", "arcface_five_points"): 68 iBUG landmarks from the photo
    path's detector (`recon.image.detect.FaceDetector`, MediaPipe: the `photo` extra): its face
    mesh run on NoW's box (`now_box_landmarks`), else the detected face whose box best overlaps
    NoW's box (IoU >= `MIN_BOX_IOU`; a face that barely overlaps it is someone else). They are
    detected once per image and cached under
    `$FACERECON_CACHE_DIR/now_landmarks/<key>/<subject>/<challenge>/<image>.npy` (key: a hash of
    the NoW root's absolute path, the image list and the landmark set; an empty array records
    "no face"), so the NoW root is only read.
    Detected landmarks are checked against NoW's box: NoW's boxes come from a face detector
    whose box is not ours, so the split's own relation between the box of the detected
    landmarks (`box_from_landmarks`) and NoW's box is measured first (`BoxRelation`: the median
    scale and centre offset over all detections of the split). A detection whose box strays
    from that relation by more than `MAX_BOX_DEVIATION` (a fraction of the box side) is not
    trusted as placed: on the built-in split these are occluded faces whose mesh the occluder
    pulled off the face, and their crops were the worst of the split. Their landmarks are moved
    (scale and shift, no rotation) until their box sits on NoW's box as the relation says, so
    the crop keeps the detection's rotation and takes its scale and place from NoW's box
    (`PredictionReport.crop_corrections`).
    No face: the landmarks of the predictor's FLAME template (zero code) projected
    orthographically (`recon.image.crop.reference_points`), placed on NoW's box the same way,
    then the same landmark crop. Such images are listed in `PredictionReport.crop_fallbacks`.
    eval.py prints both lists and writes them to results.json.
    Refinement, off by default (`predict_split(refine=True)`, `refine_sources`): each of these
    untrusted crops is cut again from the landmarks the model itself predicts from it, when they
    pass the same box check (`PredictionReport.crop_refined`). Measured with
    `scripts/now_crop_check.py` on the built-in split it helped one model's occlusion images
    and cost another's a little (README "NoW"), so eval.py does not use it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from typing import Callable, Optional, Sequence

import numpy as np

from recon.image import crop as crop_lib
from recon.image.crop import BoxRelation, centre_and_side, place_on_box, template_points
from recon.image import detect
from recon.image.io import ImageReadError, read_image
from recon.now import io as now_io

LANDMARKS_DIR = "now_landmarks"
# How the cached landmarks were found (part of the cache key: a change re-detects).
LANDMARK_METHOD = "mesh-on-now-box/1"
MIN_BOX_IOU = 0.1
# A detection whose landmark box differs from NoW's box (after the split's relation between the
# two is taken out) by more than this fraction of its side, in scale (log) or centre, is moved
# onto NoW's box. On the built-in split, 90 % of neutral faces are within 0.042; the occlusion
# images beyond 0.08 scored 1.44 x their subject's neutral-challenge error, the others 1.10 x
# (a model trained on wide scenes, detections used as found).
MAX_BOX_DEVIATION = 0.08
# Fewer detections than this: no relation is measured (NoW's box is taken as the landmark box).
MIN_RELATION_DETECTIONS = 8


@dataclasses.dataclass(frozen=True)
class CropSource:
    """What one NoW image's crop is fitted to.

      box: (4,) float64 NoW's detected-face box [left, top, right, bottom], pixels.
      landmarks: (68, 2) iBUG-68 points in pixels (detected, or the template fallback), None for
        box-anchored crops.
      fallback: True when no face was detected and the landmarks are the template's.
      box_corrected: True when the detected landmarks strayed from NoW's box and were moved
        onto it (`place_on_box`).
      refined: True when the landmarks are the model's own, predicted from the crop of the
        fallback or corrected landmarks (`refine_sources`).
    """

    box: np.ndarray
    landmarks: Optional[np.ndarray] = None
    fallback: bool = False
    box_corrected: bool = False
    refined: bool = False


@dataclasses.dataclass(frozen=True)
class PredictionReport:
    """written: the keys predicted (`subject/challenge/image`), in order; crop_fallbacks: the
    keys whose crop came from NoW's box through the template's landmarks (no face detected);
    crop_corrections: the keys whose detected landmarks were moved onto NoW's box;
    crop_refined: the keys of either kind cropped again from the model's own landmarks."""

    written: list
    crop_fallbacks: list
    crop_corrections: list = dataclasses.field(default_factory=list)
    crop_refined: list = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------- paths and files

def image_path(root: os.PathLike, entry: now_io.ImageEntry) -> pathlib.Path:
    return pathlib.Path(root) / now_io.IMAGES_DIR / entry.subject / entry.challenge / entry.image


def face_box_path(root: os.PathLike, entry: now_io.ImageEntry) -> pathlib.Path:
    return pathlib.Path(root) / now_io.FACE_BOXES_DIR / entry.relative(".npy")


def read_now_image(root: os.PathLike, entry: now_io.ImageEntry) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a NoW image (`recon.image.read_image`); NowFileError if unreadable."""
    try:
        return read_image(image_path(root, entry))
    except ImageReadError as exc:
        raise now_io.NowFileError(str(exc)) from exc


def landmark_cache_dir(root: os.PathLike, entries: Sequence[now_io.ImageEntry],
                       base: Optional[os.PathLike] = None) -> pathlib.Path:
    """`<base>/now_landmarks/<key>`: key = hash of the root's absolute path, the image list and
    the landmark set (base: $FACERECON_CACHE_DIR, default ~/.cache/facerecon_jax)."""
    digest = hashlib.sha256(str(pathlib.Path(root).absolute()).encode())
    digest.update(detect.LANDMARK_SET.encode())
    digest.update(LANDMARK_METHOD.encode())
    for entry in entries:
        digest.update(b"\n" + entry.key.encode())
    base = pathlib.Path(base) if base is not None else now_io.cache_base()
    return base / LANDMARKS_DIR / digest.hexdigest()[:16]


def _read_cached_landmarks(path: pathlib.Path) -> Optional[np.ndarray]:
    """(68, 2) or (0, 2) float32 from the cache, None when absent or unusable (re-detected)."""
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as handle:
            points = np.load(handle, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if points.shape not in ((68, 2), (0, 2)) or not np.all(np.isfinite(points)):
        return None
    return points.astype(np.float32)


# ----------------------------------------------------------------------------- crops

def _has_extent(points: np.ndarray) -> bool:
    """Landmarks that span a box (a detection collapsed to a point or a line is no face)."""
    span = np.ptp(np.asarray(points, np.float64), axis=0)
    return bool(np.all(span > 1e-3))


def relation_of(points: np.ndarray, box) -> tuple[float, np.ndarray]:
    """(scale, shift (2,)) of one image: how `box` sits on the box of `points` (68, 2)."""
    centre, side = centre_and_side(crop_lib.box_from_landmarks(points))
    box_centre, box_side = centre_and_side(crop_lib.check_box(box))
    return box_side / side, (box_centre - centre) / side


def measure_box_relation(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> BoxRelation:
    """The median `BoxRelation` over (landmarks (68, 2), box (4,)) pairs of one split; the
    default relation when there are fewer than MIN_RELATION_DETECTIONS pairs."""
    if len(pairs) < MIN_RELATION_DETECTIONS:
        return BoxRelation()
    scales, shifts = zip(*(relation_of(points, box) for points, box in pairs))
    shift = np.median(np.stack(shifts), axis=0)
    return BoxRelation(scale=float(np.median(scales)), shift=(float(shift[0]), float(shift[1])))


def box_deviation(points: np.ndarray, box, relation: BoxRelation) -> float:
    """How far `box` is from where `relation` puts it for these landmarks: the larger of
    |log(scale ratio)| and the centre's offset (max over x, y) in landmark-box sides."""
    scale, shift = relation_of(points, box)
    return max(abs(float(np.log(scale / relation.scale))),
               float(np.max(np.abs(shift - np.asarray(relation.shift)))))


def fallback_landmarks(template: np.ndarray, box, relation: BoxRelation = BoxRelation()
                       ) -> np.ndarray:
    """(68, 2) the `template` points placed on `box` (`place_on_box`): with the default
    relation, their `box_from_landmarks` box gets `box`'s centre and mean side."""
    return place_on_box(template, box, relation)


def now_box_landmarks(detector, image: np.ndarray, box) -> Optional[np.ndarray]:
    """(68, 2) landmarks of the face in NoW's box, or None when no face is found there.

    NoW gives every image its face box, so the face mesh runs on that box first
    (`FaceDetector.landmarks`): MediaPipe's own face detector misses close, large or occluded
    faces (on the built-in split it found no face in any selfie and in 59 of 100 occlusion
    images). Only when the mesh finds nothing there are the detector's faces searched for the
    one that overlaps the box (`best_face_landmarks`)."""
    points = detector.landmarks(image, np.asarray(box, np.float64))
    if points is not None:
        return np.asarray(points[detect.MEDIAPIPE_TO_IBUG68], np.float32)
    return best_face_landmarks(detector(image), box)


def best_face_landmarks(faces: Sequence[detect.Face], box) -> Optional[np.ndarray]:
    """(68, 2) landmarks of the face whose box overlaps `box` most (IoU >= MIN_BOX_IOU), or None."""
    scored = [(detect.box_iou(face.box, box), face) for face in faces]
    if not scored:
        return None
    iou, face = max(scored, key=lambda item: item[0])
    return np.asarray(face.landmarks_68, np.float32) if iou >= MIN_BOX_IOU else None


def crop_sources(root: os.PathLike, entries: Sequence[now_io.ImageEntry],
                 spec: crop_lib.CropSpec, flame, *, cache_dir: Optional[os.PathLike] = None,
                 detector_factory: Optional[Callable] = None, progress: bool = True,
                 max_box_deviation: float = MAX_BOX_DEVIATION) -> list[CropSource]:
    """The `CropSource` of every entry for crops of `spec` (see the module docstring).

    flame: the predictor's FLAME model (its template gives the no-face fallback).
    cache_dir: the cache base (default $FACERECON_CACHE_DIR or ~/.cache/facerecon_jax).
    detector_factory: () -> a `FaceDetector`-like context manager (default `FaceDetector`);
    called only when some image's landmarks are not cached. Raises `PhotoExtraMissing` naming
    the install command when mediapipe is needed and absent.
    max_box_deviation: detections straying further from NoW's box are moved onto it (inf: every
    detection is used as found).
    """
    boxes = [now_io.face_box_array(now_io.read_face_box(face_box_path(root, entry)))
             for entry in entries]
    if not spec.needs_landmarks:
        return [CropSource(box=box) for box in boxes]
    folder = landmark_cache_dir(root, entries, cache_dir)
    points = [_read_cached_landmarks(folder / entry.relative(".npy")) for entry in entries]
    todo = [index for index, found in enumerate(points) if found is None]
    if todo:
        _detect_into_cache(root, entries, boxes, points, todo, folder, spec,
                           detector_factory or detect.FaceDetector, progress)
    relation = measure_box_relation([(found.astype(np.float64), box)
                                     for box, found in zip(boxes, points)
                                     if len(found) and _has_extent(found)])
    template = None
    sources = []
    for box, found in zip(boxes, points):
        if len(found) and _has_extent(found):
            found = found.astype(np.float64)
            if box_deviation(found, box, relation) <= max_box_deviation:
                sources.append(CropSource(box=box, landmarks=found))
            else:
                sources.append(CropSource(box=box, landmarks=place_on_box(found, box, relation),
                                          box_corrected=True))
            continue
        template = template_points(flame) if template is None else template
        sources.append(CropSource(box=box, landmarks=fallback_landmarks(template, box, relation),
                                  fallback=True))
    return sources


def _detect_into_cache(root, entries, boxes, points, todo, folder, spec, detector_factory,
                       progress) -> None:
    from tqdm import tqdm

    try:
        detector = detector_factory()
    except detect.PhotoExtraMissing as exc:
        raise detect.PhotoExtraMissing(
            f"this model crops faces by landmarks (crop anchor {spec.anchor!r}), so NoW images "
            f"need 68 detected landmarks, which come from mediapipe: {detect.PHOTO_EXTRA_HINT} "
            f"({len(todo)} of {len(entries)} images are not in the landmark cache {folder})"
        ) from exc
    with detector, tqdm(total=len(todo), desc="NoW landmarks", unit="image",
                        disable=not progress) as bar:
        for index in todo:
            entry = entries[index]
            found = now_box_landmarks(detector, read_now_image(root, entry), boxes[index])
            found = np.zeros((0, 2), np.float32) if found is None else found
            now_io.write_file(folder / entry.relative(".npy"),
                              lambda handle, array=found: np.save(handle, array,
                                                                  allow_pickle=False))
            points[index] = found
            bar.update(1)


def _padded(images: np.ndarray, batch_size: int) -> np.ndarray:
    """`images` (n <= batch_size, ...) with zero images appended up to `batch_size`, so the
    predictor sees one shape and compiles once."""
    padding = np.zeros((batch_size - len(images),) + images.shape[1:], images.dtype)
    return np.concatenate([images, padding])


def refine_sources(root: os.PathLike, entries: Sequence[now_io.ImageEntry],
                   sources: Sequence[CropSource], predictor, *, batch_size: int = 16,
                   max_box_deviation: float = MAX_BOX_DEVIATION) -> list[CropSource]:
    """`sources` with each untrusted crop (template fallback or box-corrected detection)
    re-made from the model's own 68 landmarks: the model predicts from that first crop, its
    posed landmarks (`Predictor.landmarks_2d`) go back to the image (`Crop.to_image`) and cut
    the crop again, as its training crops were cut from a face's landmarks (one pass). A
    refinement whose landmark box strays from NoW's box by more than `max_box_deviation` (the
    split's relation, as for detections; inf: no check) is not used."""
    sources = list(sources)
    todo = [index for index, source in enumerate(sources)
            if source.landmarks is not None and (source.fallback or source.box_corrected)]
    if not todo:
        return sources
    relation = measure_box_relation([(source.landmarks, source.box) for source in sources
                                     if source.landmarks is not None and not source.fallback])
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        crops = [load_crop(root, entries[index], predictor.crop, sources[index])
                 for index in chunk]
        images = _padded(np.stack([crop.image for crop in crops]), batch_size)
        predicted = np.asarray(predictor.landmarks_2d(predictor(images)), np.float64)
        for index, crop, points in zip(chunk, crops, predicted):
            points = crop.to_image(points)
            if np.all(np.isfinite(points)) and \
                    box_deviation(points, sources[index].box, relation) <= max_box_deviation:
                sources[index] = dataclasses.replace(sources[index], landmarks=points,
                                                     refined=True)
    return sources


def load_crop(root: os.PathLike, entry: now_io.ImageEntry, spec: crop_lib.CropSpec,
              source: CropSource) -> crop_lib.Crop:
    """The `spec` crop of one NoW image (`recon.image.crop_image`)."""
    return crop_lib.crop_image(read_now_image(root, entry), spec, box=source.box,
                               landmarks=source.landmarks)


# ----------------------------------------------------------------------------- prediction

def predict_split(root: os.PathLike, entries: Sequence[now_io.ImageEntry], predictor,
                  out_dir: os.PathLike, *, sources: Optional[Sequence[CropSource]] = None,
                  batch_size: int = 16, progress: bool = True,
                  cache_dir: Optional[os.PathLike] = None,
                  detector_factory: Optional[Callable] = None,
                  refine: bool = False) -> PredictionReport:
    """Crop, predict and write every entry.

    predictor: a `recon.inference.Predictor` (`.crop`, `.flame`, `predictor(crops) -> Code`,
    `.mesh(code, neutral=True)`, `.landmarks_2d(code)`). sources: the entries' `CropSource`s
    when the caller keeps them (training evaluates the same images at every step); default
    `crop_sources(...)`. refine: re-crop the untrusted faces (fallback or box-corrected) from
    this model's own landmarks first (`refine_sources`). Every batch holds `batch_size` crops
    (the last one padded), so the predictor compiles once.
    """
    from tqdm import tqdm

    entries = list(entries)
    if sources is None:
        sources = crop_sources(root, entries, predictor.crop, predictor.flame,
                               cache_dir=cache_dir, detector_factory=detector_factory,
                               progress=progress)
    if len(sources) != len(entries):
        raise ValueError(f"got {len(sources)} crop sources for {len(entries)} entries")
    if refine:
        sources = refine_sources(root, entries, sources, predictor, batch_size=batch_size)
    faces = np.asarray(predictor.flame.faces)
    batch_size = max(1, min(batch_size, len(entries)))
    written = []
    with tqdm(total=len(entries), desc="NoW predict", unit="image", disable=not progress) as bar:
        for start in range(0, len(entries), batch_size):
            chunk = entries[start:start + batch_size]
            crops = _padded(np.stack([
                load_crop(root, entry, predictor.crop, source).image
                for entry, source in zip(chunk, sources[start:start + batch_size])]), batch_size)
            vertices, landmarks = predictor.mesh(predictor(crops), neutral=True)
            vertices, landmarks = np.asarray(vertices), np.asarray(landmarks)
            for entry, mesh, points in zip(chunk, vertices, landmarks):
                now_io.write_prediction(out_dir, entry, mesh, faces, points)
                written.append(entry.key)
            bar.update(len(chunk))
    fallbacks = [entry.key for entry, source in zip(entries, sources) if source.fallback]
    corrections = [entry.key for entry, source in zip(entries, sources) if source.box_corrected]
    refined = [entry.key for entry, source in zip(entries, sources) if source.refined]
    return PredictionReport(written=written, crop_fallbacks=fallbacks,
                            crop_corrections=corrections, crop_refined=refined)


def mean_face(flame) -> tuple[np.ndarray, np.ndarray]:
    """(vertices (V, 3), landmarks7 (7, 3)) metres of the FLAME template: `code_to_mesh` of a
    zero code (zero shape, expression and pose)."""
    import jax.numpy as jnp

    from recon.inference import code_to_mesh
    from recon.types import CODE_SIZE, split_code

    vertices, landmarks = code_to_mesh(flame, split_code(jnp.zeros((1, CODE_SIZE), jnp.float32)))
    return np.asarray(vertices[0], np.float64), np.asarray(landmarks[0], np.float64)


def write_mean_face(flame, entries: Sequence[now_io.ImageEntry], out_dir: os.PathLike) -> None:
    """The template mesh (`mean_face`) as the prediction of every entry: the zero-skill score a
    model must beat. The files are encoded once and copied."""
    entries = list(entries)
    if not entries:
        return
    vertices, landmarks = mean_face(flame)
    out_dir = pathlib.Path(out_dir)
    now_io.write_prediction(out_dir, entries[0], vertices, np.asarray(flame.faces), landmarks)
    mesh = (out_dir / entries[0].relative(".obj")).read_bytes()
    points = (out_dir / entries[0].relative(".npy")).read_bytes()
    for entry in entries[1:]:
        now_io.write_file(out_dir / entry.relative(".obj"), mesh)
        now_io.write_file(out_dir / entry.relative(".npy"), points)
