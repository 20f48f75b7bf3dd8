"""From photos to FLAME meshes: `python -m recon.predict PHOTO_OR_FOLDER --out DIR [--fit]
[--checkpoint CKPT] [--flame-model PATH] [--all-faces]`.

Modes:
  --fit                analysis-by-synthesis fitting through our renderer (`recon.photo.fitting`);
                       needs no trained weights. The default when no --checkpoint is given.
  --checkpoint DIR     the trained regressor (`recon.inference.load_predictor(DIR)`) on its crop.
  --checkpoint DIR --fit  the regressed code initialises the fit (in the regressor's crop).

Photos are read with `recon.image.read_image(path, apply_exif_orientation=True)` (phone photos
are turned upright before detection); faces, boxes and iBUG-68 landmarks come from
`recon.image.detect.FaceDetector`. The face crop (`recon.image.crop_image`) is the one the model
works in: with --checkpoint the regressor's own `predictor.crop` (the `CropSpec` it was trained
on, stored with the checkpoint: box anchors from the detected box, landmark anchors from the
detected 68 landmarks, at its size, e.g. 150 px); without, `FIT_CROP` (1.6 x the mean side of
the detected box, 224 px). Fitted landmarks and overlays map back to the photo through the
crop's inverse (`Crop.to_image`).

Per image `<stem>` (`<stem>_face<i>` for every face with --all-faces; else the largest face):
  DIR/<stem>.obj, .ply, .glb   posed FLAME mesh, metres (model frame, no camera);
  DIR/<stem>.npy               NoW's 7 landmarks (7, 3) of that mesh, metres;
  DIR/<stem>_code.npz          the code fields (shape, pose, expression, texture, camera, light;
                               1-D arrays; camera in the NDC of the crop: `FIT_CROP`, or the
                               checkpoint's crop with --checkpoint);
  DIR/<stem>_overlay.png       input crop | shaded render | render over the input with the
                               detected (green) and fitted (red) landmarks, each panel the crop
                               at `overlay_factor(crop size)` x its size (448 px for 224 crops);
  DIR/<stem>.json              {"box", "landmark_set", "landmarks_detected", "landmarks_fitted",
                               "landmark_error_px": {"initial", "final"}} in image pixels.
DIR/failures.json lists the files that failed ([] when none: unreadable file, no face, or an error
while reconstructing); the exit status is 1 when any failed, 0 otherwise (2: bad arguments).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np

from recon.image.crop import CropSpec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# NoW's 7 points (iBUG-68 36, 39, 42, 45, 33, 48, 54) as indices into FLAME's 51 static landmarks.
NOW_STATIC_INDICES = (19, 22, 25, 28, 16, 31, 37)
# The crop of fitting without a regressor: NoW's and DECA's (1.6 x the mean side of the face box,
# centred on it, no rotation) at 224 px.
FIT_CROP = CropSpec(anchor="box", scale=1.6, box_side="mean", size=224)
# The overlay panels' side aimed at: the crop size times the integer nearest OVERLAY_SIZE / size,
# so the render is an exact zoom of the crop's view (448 for 224 crops, 450 for 150).
OVERLAY_SIZE = 448
DETECTED_COLOR = (40, 220, 40)
FITTED_COLOR = (255, 40, 40)


class NoFaceError(RuntimeError):
    """No face was found in an image."""


@dataclasses.dataclass(frozen=True)
class FaceReconstruction:
    """One reconstructed face (numpy, batch axis removed).

    code: {field: (n,) array} of `recon.types.Code`; vertices: (V, 3) posed mesh, metres;
    landmarks_3d: (68, 3) metres; now_landmarks: (7, 3) metres; landmarks_fitted: (68, 2) image
    pixels; initial_error_px, final_error_px: mean 2D landmark distances, image pixels;
    seconds: reconstruction time (detection excluded).
    """

    code: dict
    vertices: np.ndarray
    landmarks_3d: np.ndarray
    now_landmarks: np.ndarray
    landmarks_fitted: np.ndarray
    initial_error_px: float
    final_error_px: float
    seconds: float


# ----------------------------------------------------------------------------- library


def load_regressor(checkpoint: str) -> Callable:
    """`recon.inference.load_predictor(checkpoint)`: a `Predictor`, (B, S, S, 3) crops in [0, 1]
    cut with its `.crop` -> Code. Raises FileNotFoundError for a missing directory and
    `PredictorLoadError` (a ValueError) for one that holds no regressor."""
    path = pathlib.Path(checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such directory")
    from recon import inference  # noqa: PLC0415 - heavy, only for the regression mode

    return inference.load_predictor(path)


def now_landmarks(landmarks_68: np.ndarray) -> np.ndarray:
    """(..., 68, 3) FLAME landmarks -> (..., 7, 3) NoW points (static-51 indices)."""
    return np.asarray(landmarks_68)[..., 17:, :][..., list(NOW_STATIC_INDICES), :]


def overlay_factor(crop_size: int) -> int:
    """The integer zoom of the overlay panels over a crop of `crop_size` pixels."""
    return max(1, int(round(OVERLAY_SIZE / int(crop_size))))


class Reconstructor:
    """Holds the FLAME model, fitting assets, the crop spec and the optional regressor; call it
    per face.

    crop: the regressor's `predictor.crop` (it must have one: a model predicts only from the crop
    it was trained on), else `FIT_CROP`.
    """

    def __init__(self, *, fit: bool, predictor: Optional[Callable] = None,
                 flame_model_path: Optional[str] = None, fit_options=None):
        import flame_jax  # noqa: PLC0415 - keep `--help` fast
        from recon.photo import fitting  # noqa: PLC0415

        if not fit and predictor is None:
            raise ValueError("nothing to do: fit=False and no predictor")
        if predictor is None:
            self.crop = FIT_CROP
        else:
            crop = getattr(predictor, "crop", None)
            if not isinstance(crop, CropSpec):
                raise TypeError(f"the predictor must say which crop it predicts from (.crop, a "
                                f"recon.image.CropSpec), got {crop!r}")
            self.crop = crop
        synthetic = flame_jax.synthetic()
        # The FLAME model decoding the codes: the given file, else the one the regressor was
        # trained with (`recon.inference.Predictor.flame`), else the built-in one.
        if flame_model_path:
            self.model = flame_jax.load(flame_model_path)
        elif getattr(predictor, "flame", None) is not None:
            self.model = predictor.flame
        else:
            self.model = synthetic
        self.assets = fitting.make_assets(self.model, albedo_source=synthetic)
        self.fit = fit
        self.predictor = predictor
        self.options = fit_options or fitting.FitOptions()

    def crop_face(self, image: np.ndarray, face):
        """The `recon.image.Crop` of a detected face with `self.crop` (box anchors from its
        box, landmark anchors from its 68 landmarks)."""
        from recon.image import crop_image  # noqa: PLC0415

        return crop_image(image, self.crop, box=face.box, landmarks=face.landmarks_68)

    def __call__(self, image: np.ndarray, face) -> tuple[FaceReconstruction, dict]:
        """-> (FaceReconstruction, visuals {crop (`recon.image.Crop`, S x S), landmarks_crop
        (68, 2), fitted_crop (68, 2) crop pixels, code (Code)}) for one detected
        `recon.image.detect.Face` in an (H, W, 3) uint8 image."""
        from recon.image import crop as crop_lib  # noqa: PLC0415
        from recon.image import detect  # noqa: PLC0415
        from recon.photo import fitting  # noqa: PLC0415
        from recon.types import Code  # noqa: PLC0415

        start = time.perf_counter()
        size = self.crop.size
        crop = self.crop_face(image, face)
        landmarks_crop = crop.to_crop(face.landmarks_68)[None].astype(np.float32)
        weights = detect.landmark_weights()[None]
        if self.predictor is not None:
            init = self.predictor(crop.image[None])
            if not isinstance(init, Code):
                raise TypeError(f"the predictor must return a recon.types.Code, got "
                                f"{type(init).__name__}")
        else:
            init = fitting.initial_code(self.model, landmarks_crop, weights, self.options,
                                        image_size=size)
        target = fitting.make_target(crop.image[None], landmarks_crop, weights,
                                     np.asarray(init.camera),
                                     skin_colour_mask_on=self.options.skin_colour_mask)
        if self.fit:
            result = fitting.fit(self.assets, target, init, self.options)
            code, fitted_crop = result.code, np.asarray(result.landmarks_2d)[0]
            initial_crop_px = float(result.initial_error_px[0])
        else:
            code = init
            fitted_crop = np.asarray(fitting.landmarks_2d(code, self.model, image_size=size))[0]
            initial_crop_px = None
        flame = fitting.flame_forward(self.model, code.flame_params())
        landmarks_3d = np.asarray(flame.landmarks)[0]
        fitted_image = crop.to_image(fitted_crop)
        final = float(np.mean(np.linalg.norm(fitted_image - face.landmarks_68, axis=-1)))
        # Crop and image pixels differ by the crop's uniform scale (a similarity).
        initial = final if initial_crop_px is None else \
            initial_crop_px / crop_lib.similarity_scale(crop.matrix)
        seconds = time.perf_counter() - start
        reconstruction = FaceReconstruction(
            code={name: np.asarray(getattr(code, name))[0] for name in
                  ("shape", "pose", "expression", "texture", "camera", "light")},
            vertices=np.asarray(flame.vertices)[0], landmarks_3d=landmarks_3d,
            now_landmarks=now_landmarks(landmarks_3d), landmarks_fitted=fitted_image,
            initial_error_px=initial, final_error_px=final, seconds=seconds)
        visuals = {"crop": crop, "landmarks_crop": landmarks_crop[0], "fitted_crop": fitted_crop,
                   "code": code}
        return reconstruction, visuals

    def overlay(self, image: np.ndarray, visuals: dict) -> np.ndarray:
        """(k S, 3 k S, 3) uint8, k = `overlay_factor(S)`: input crop | shaded render | render
        over the input, the crop of `visuals` redrawn k times larger from the photo."""
        from recon import render as render_lib  # noqa: PLC0415
        from recon.image import crop as crop_lib  # noqa: PLC0415
        from recon.photo import fitting  # noqa: PLC0415
        from recon.render import shading  # noqa: PLC0415

        factor = overlay_factor(self.crop.size)
        size = factor * self.crop.size
        # The same window k times larger: image -> crop, then a zoom by k (exact, also for the
        # landmark anchors, whose matrices are not linear in the crop size).
        pixels = crop_lib.warp(image, factor * np.asarray(visuals["crop"].matrix), size)
        code = visuals["code"]
        flame = fitting.flame_forward(self.model, code.flame_params())
        albedo = shading.albedo_from_texture(self.assets.albedo_mean, self.assets.albedo_basis,
                                             code.texture)
        # The camera is in NDC, so the same code renders the same view at any resolution.
        rendered = render_lib.render(
            flame.vertices, self.model.faces, code.camera, code.sh_light, albedo,
            settings=fitting.raster_settings(size), sigma=0.5)
        if int(rendered.overflow[0]):
            print(f"warning: overlay render incomplete ({int(rendered.overflow[0])} triangles or "
                  f"tiles over capacity)", file=sys.stderr)
        return overlay_panels(pixels, np.asarray(rendered.image)[0], np.asarray(rendered.mask)[0],
                              factor * visuals["landmarks_crop"], factor * visuals["fitted_crop"])


def overlay_panels(crop: np.ndarray, render_image: np.ndarray, mask: np.ndarray,
                   detected_px: np.ndarray, fitted_px: np.ndarray) -> np.ndarray:
    """(H, 3 W, 3) uint8: crop | render on grey | render (70 %) over the crop + landmarks.

    crop, render_image: (H, W, 3) float [0, 1]; mask: (H, W) coverage; landmarks (68, 2) pixels.
    """
    from PIL import Image, ImageDraw  # noqa: PLC0415

    def to_uint8(x):
        return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)

    alpha = np.asarray(mask, np.float32)[..., None]
    shaded = alpha * render_image + (1.0 - alpha) * 0.5
    blended = 0.7 * alpha * render_image + (1.0 - 0.7 * alpha) * crop
    panel = Image.fromarray(to_uint8(blended))
    draw = ImageDraw.Draw(panel)
    radius = max(1.5, crop.shape[0] / 224.0)
    for points, color in ((detected_px, DETECTED_COLOR), (fitted_px, FITTED_COLOR)):
        for u, v in np.asarray(points, np.float64):
            if np.isfinite(u) and np.isfinite(v):
                draw.ellipse([u - radius, v - radius, u + radius, v + radius], fill=color)
    return np.concatenate([to_uint8(crop), to_uint8(shaded), np.asarray(panel)], axis=1)


def write_outputs(out_dir: pathlib.Path, stem: str, face, reconstruction: FaceReconstruction,
                  faces_topology: np.ndarray, overlay: np.ndarray, landmark_set: str) -> list:
    """Write the fixed per-face outputs; returns the paths written."""
    from PIL import Image  # noqa: PLC0415
    from flame_jax.fileio import atomic_write, write_mesh  # noqa: PLC0415
    import io  # noqa: PLC0415

    paths = [write_mesh(out_dir / f"{stem}{suffix}", reconstruction.vertices, faces_topology)
             for suffix in (".obj", ".ply", ".glb")]

    def npy_bytes(array):
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(array, np.float32))
        return buffer.getvalue()

    def npz_bytes(arrays):
        buffer = io.BytesIO()
        np.savez(buffer, **{k: np.asarray(v, np.float32) for k, v in arrays.items()})
        return buffer.getvalue()

    def png_bytes(array):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    summary = {
        "box": [float(v) for v in face.box],
        "landmark_set": landmark_set,
        "landmarks_detected": np.asarray(face.landmarks_68, float).round(3).tolist(),
        "landmarks_fitted": np.asarray(reconstruction.landmarks_fitted, float).round(3).tolist(),
        "landmark_error_px": {"initial": round(reconstruction.initial_error_px, 4),
                              "final": round(reconstruction.final_error_px, 4)},
    }
    paths.append(atomic_write(out_dir / f"{stem}.npy", npy_bytes(reconstruction.now_landmarks)))
    paths.append(atomic_write(out_dir / f"{stem}_code.npz", npz_bytes(reconstruction.code)))
    paths.append(atomic_write(out_dir / f"{stem}_overlay.png", png_bytes(overlay)))
    paths.append(atomic_write(out_dir / f"{stem}.json", json.dumps(summary, indent=1)))
    return paths


def list_images(source: pathlib.Path) -> list[pathlib.Path]:
    """A file -> [it]; a folder -> its image files (by suffix, not recursive), sorted."""
    if source.is_dir():
        return sorted(p for p in source.iterdir()
                      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if source.is_file():
        return [source]
    raise FileNotFoundError(f"{source}: no such file or folder")


def process_image(path: pathlib.Path, out_dir: pathlib.Path, detector, reconstructor,
                  *, all_faces: bool) -> list[FaceReconstruction]:
    """Detect, reconstruct and write one image; raises ImageReadError / NoFaceError."""
    from recon.image import detect, read_image  # noqa: PLC0415

    image = read_image(path, apply_exif_orientation=True)
    faces = detector(image)
    if not faces:
        raise NoFaceError(f"{path}: no face found")
    chosen = faces if all_faces else faces[:1]
    results = []
    for index, face in enumerate(chosen):
        stem = f"{path.stem}_face{index}" if all_faces else path.stem
        reconstruction, visuals = reconstructor(image, face)
        overlay = reconstructor.overlay(image, visuals)
        write_outputs(out_dir, stem, face, reconstruction, np.asarray(reconstructor.model.faces),
                      overlay, detect.LANDMARK_SET)
        results.append(reconstruction)
    return results


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recon.predict", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="an image file or a folder of images")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--fit", action="store_true",
                        help="analysis-by-synthesis fit (the default without --checkpoint)")
    parser.add_argument("--checkpoint", default=None,
                        help="trained regressor workdir (recon.inference.load_predictor); its "
                             "stored crop spec cuts the photo")
    parser.add_argument("--flame-model", default=None,
                        help="FLAME model file for flame_jax.load (default: the regressor's "
                             "own FLAME with --checkpoint, else the built-in synthetic FLAME)")
    parser.add_argument("--all-faces", action="store_true",
                        help="reconstruct every face (<stem>_face<i>) instead of the largest")
    for name, default in (("rigid", 100), ("landmark", 200), ("appearance", 40),
                          ("photometric", 60)):
        parser.add_argument(f"--{name}-steps", type=int, default=default,
                            help=f"fitting steps of the {name} stage (default {default})")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm  # noqa: PLC0415
    from recon.image import ImageReadError, detect  # noqa: PLC0415
    from recon.photo import fitting  # noqa: PLC0415

    fit = args.fit or args.checkpoint is None
    out_dir = pathlib.Path(args.out)
    try:
        images = list_images(pathlib.Path(args.source))
        options = fitting.FitOptions(
            rigid_steps=args.rigid_steps, landmark_steps=args.landmark_steps,
            appearance_steps=args.appearance_steps, photometric_steps=args.photometric_steps)
        predictor = load_regressor(args.checkpoint) if args.checkpoint else None
        if not images:
            raise FileNotFoundError(f"{args.source}: no images ({', '.join(IMAGE_SUFFIXES)})")
        reconstructor = Reconstructor(fit=fit, predictor=predictor,
                                      flame_model_path=args.flame_model, fit_options=options)
        detector = detect.FaceDetector()
    except (FileNotFoundError, ImportError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    failures, seconds = [], []
    mode = ("regression + fit" if args.checkpoint and fit else
            "regression" if args.checkpoint else "fit")
    with detector, tqdm(images, desc=f"recon.predict ({mode})", unit="image") as bar:
        for path in bar:
            try:
                results = process_image(path, out_dir, detector, reconstructor,
                                        all_faces=args.all_faces)
            except ImageReadError as error:
                failures.append({"file": str(path), "reason": "unreadable", "error": str(error)})
            except NoFaceError as error:
                failures.append({"file": str(path), "reason": "no_face", "error": str(error)})
            except Exception as error:  # noqa: BLE001 - one bad image must not stop a folder
                failures.append({"file": str(path), "reason": "error",
                                 "error": f"{type(error).__name__}: {error}"})
            else:
                seconds.extend(r.seconds for r in results)
                bar.set_postfix(error_px=f"{results[0].final_error_px:.2f}",
                                s_per_face=f"{results[0].seconds:.1f}")
                continue
            tqdm.write(f"failed: {failures[-1]['error']}", file=sys.stderr)
    from flame_jax.fileio import atomic_write  # noqa: PLC0415
    atomic_write(out_dir / "failures.json", json.dumps(failures, indent=1))
    done = len(images) - len(failures)
    timing = f", {np.mean(seconds):.1f} s per face ({mode})" if seconds else ""
    print(f"{done} of {len(images)} images reconstructed into {out_dir}{timing}; "
          f"{len(failures)} failed" + (f" (see {out_dir / 'failures.json'})" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
