"""A trained regressor for prediction: `load_predictor(workdir)(crops) -> Code`.

    predictor = load_predictor("runs/default")
    crop = recon.image.crop_image(photo, predictor.crop, landmarks=landmarks_68, box=box)
    code = predictor(crop.image[None])                       # recon.types.Code
    vertices, landmarks7 = predictor.mesh(code)              # neutral mesh, NoW's 7 points

Everything comes from the checkpoint: the config stored with the step (not `config.json`, which
a refused rerun could not have changed anyway) gives the crop spec the model was trained on
(`data.crop`), the architecture (`model`) and the FLAME model (`flame`); the parameters are read
from the step's state alone (no optimizer is built, nothing of the trainer is imported). The
crop is part of the predictor: `predictor.crop` says how to cut a photo, and a crop of another
size is refused.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

import flame_jax
from recon.image import crop as crop_lib
from recon.image import preprocess
from recon.model import build
from recon.options import to_dataclass
from recon.photo import fitting
from recon.types import NOW_LANDMARKS_68, Code, split_code

Array = jax.Array
CHECKPOINT_DIR = "checkpoints"


class PredictorLoadError(ValueError):
    """A workdir that does not hold a loadable regressor (the message names it and why)."""


def code_to_mesh(flame: flame_jax.FlameModel, code: Code, *, neutral: bool = True
                 ) -> Tuple[Array, Array]:
    """(vertices (B, V, 3), landmarks7 (B, 7, 3)) in metres of a `Code` through FLAME.

    neutral: the identity with zero pose and expression (what NoW scores and what the 3D losses
    train), else the posed head of the image. landmarks7: NoW's 7 points (`NOW_LANDMARKS_68`).
    """
    params = code.neutral_flame_params() if neutral else code.flame_params()
    output = flame_jax.forward(flame, params)
    return output.vertices, output.landmarks[:, list(NOW_LANDMARKS_68)]


_code_to_mesh_jit = jax.jit(code_to_mesh, static_argnames="neutral")


@dataclasses.dataclass(frozen=True)
class Predictor:
    """A trained regressor: `predictor(crops) -> Code`.

      apply: jitted (variables, crops (B, S, S, 3) float32 in [0, 1]) -> Code.
      variables: {"params", "batch_stats"}.
      crop: the `recon.image.CropSpec` the model was trained on (S = crop.size).
      input_kind: the backbone input kind (`recon.image.backbone_input`).
      flame: the FLAME model the run trained with; step: the checkpoint's step; workdir.
    """

    apply: Callable
    variables: dict
    crop: crop_lib.CropSpec
    input_kind: str
    flame: flame_jax.FlameModel
    step: int
    workdir: str

    def __call__(self, crops) -> Code:
        """crops: (B, S, S, 3) RGB, float in [0, 1] or uint8, cut with `self.crop`."""
        crops = np.asarray(crops) if not isinstance(crops, jax.Array) else crops
        size = self.crop.size
        if crops.ndim != 4 or tuple(crops.shape[1:]) != (size, size, 3):
            raise ValueError(f"this model predicts from ({size}, {size}, 3) crops "
                             f"({self.crop}), got shape {tuple(crops.shape)}")
        if crops.dtype == np.uint8:
            crops = crops.astype(np.float32) / np.float32(255.0)
        elif not jnp.issubdtype(crops.dtype, jnp.floating):
            raise ValueError(f"crops must be float in [0, 1] or uint8, got dtype {crops.dtype}")
        return self.apply(self.variables, jnp.asarray(crops, jnp.float32))

    def mesh(self, code: Code, *, neutral: bool = True) -> Tuple[Array, Array]:
        """(vertices (B, V, 3), landmarks7 (B, 7, 3)) metres (`code_to_mesh`)."""
        return _code_to_mesh_jit(self.flame, code, neutral=neutral)

    def landmarks_2d(self, code: Code) -> Array:
        """(B, 68, 2) the predicted 68 landmarks in pixels of this model's crop (the photo
        path's projection, `recon.photo.fitting.landmarks_2d`)."""
        return fitting.landmarks_2d(code, self.flame, image_size=self.crop.size)

    def crop_image(self, image: np.ndarray, *, box=None, landmarks=None) -> crop_lib.Crop:
        """The crop this model predicts from (`recon.image.crop_image` with `self.crop`)."""
        return crop_lib.crop_image(image, self.crop, box=box, landmarks=landmarks)


def make_apply(model, input_kind: str) -> Callable:
    """jitted (variables, crops in [0, 1]) -> Code: the backbone preprocessing on device
    (`recon.image.backbone_input_jax`), then the regressor."""

    @jax.jit
    def apply(variables, crops):
        inputs = preprocess.backbone_input_jax(crops, input_kind)
        return split_code(model.apply(variables, inputs, train=False))

    return apply


def predictor_from_variables(model, variables: dict, *, crop: crop_lib.CropSpec,
                             input_kind: str, flame: flame_jax.FlameModel, step: int = 0,
                             workdir: str = "") -> Predictor:
    """A `Predictor` from a regressor module and its variables (e.g. a training state)."""
    return Predictor(apply=make_apply(model, input_kind), variables=variables, crop=crop,
                     input_kind=input_kind, flame=flame, step=int(step), workdir=str(workdir))


def _steps(checkpoint_dir: pathlib.Path) -> list:
    if not checkpoint_dir.is_dir():
        return []
    return sorted(int(path.name) for path in checkpoint_dir.iterdir()
                  if path.is_dir() and path.name.isdigit())


def stored_config(workdir, step: Optional[int] = None) -> Tuple[int, dict]:
    """(step, config dict) stored with a checkpoint step of `workdir` (latest by default)."""
    import orbax.checkpoint as ocp

    workdir = pathlib.Path(workdir)
    checkpoint_dir = (workdir / CHECKPOINT_DIR).absolute()
    steps = _steps(checkpoint_dir)
    if not steps:
        raise PredictorLoadError(
            f"{workdir} holds no regressor checkpoint (expected {checkpoint_dir}/<step>/, "
            f"written by `python train.py --config configs/default.py --workdir {workdir}`)")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise PredictorLoadError(f"{workdir} has no step {step}; steps present: {steps}")
    with ocp.CheckpointManager(checkpoint_dir) as manager:
        try:
            run = manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
        except Exception as error:  # orbax raises several types for missing/foreign items
            raise PredictorLoadError(f"{checkpoint_dir} step {step}: no readable run config "
                                     f"({type(error).__name__}: {error})") from error
    if not isinstance(run, dict) or "config" not in run:
        raise PredictorLoadError(f"{checkpoint_dir} step {step}: the run item holds no config")
    return step, run["config"]


def read_model_options(config: dict, where: str = "checkpoint"
                       ) -> Tuple[build.ModelOptions, crop_lib.CropSpec, build.FlameOptions]:
    """(model, crop, flame) options of a stored regressor config."""
    if config.get("task") != "regressor":
        raise PredictorLoadError(f"{where}: config.task is {config.get('task')!r}, not a "
                                 f"regressor run")
    data = config.get("data") or {}
    if "crop" not in data:
        raise PredictorLoadError(f"{where}: the run's config has no data.crop (it was trained "
                                 f"before the crop was part of the config); retrain it")
    try:
        model = to_dataclass(config["model"], build.ModelOptions, prefix="model")
        crop = to_dataclass(data["crop"], crop_lib.CropSpec, prefix="data.crop")
        flame = to_dataclass(config.get("flame", {}), build.FlameOptions, prefix="flame")
    except (TypeError, ValueError, KeyError) as error:
        raise PredictorLoadError(f"{where}: unreadable model options: {error}") from error
    return model, crop, flame


def load_predictor(workdir, *, step: Optional[int] = None) -> Predictor:
    """The regressor of a training workdir (its latest checkpoint, or `step`).

    Raises PredictorLoadError naming the workdir when it holds no checkpoint or its config
    describes no regressor; FLAME files named by the config must still exist.
    """
    import orbax.checkpoint as ocp

    workdir = pathlib.Path(workdir)
    step, config = stored_config(workdir, step)
    model_options, crop, flame_options = read_model_options(config, str(workdir))
    flame = build.load_flame(flame_options)
    model, _ = build.build_model(model_options, camera=(1.0, 0.0, 0.0), load_weights=False)
    shape = (1,) + build.input_shape(model_options)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape, jnp.float32))
    target = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(restore_type=np.ndarray), target)
    checkpoint_dir = (workdir / CHECKPOINT_DIR).absolute()
    with ocp.CheckpointManager(checkpoint_dir) as manager:
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True)))["state"]
        except Exception as error:  # orbax raises several types for foreign structures
            raise PredictorLoadError(f"{checkpoint_dir} step {step}: the parameters do not fit "
                                     f"the model its config describes ({type(error).__name__}: "
                                     f"{error})") from error
    variables = {"params": jax.tree.map(jnp.asarray, restored["params"]),
                 "batch_stats": jax.tree.map(jnp.asarray, restored.get("batch_stats") or {})}
    return predictor_from_variables(model, variables, crop=crop,
                                    input_kind=model_options.input_kind, flame=flame, step=step,
                                    workdir=str(workdir))
