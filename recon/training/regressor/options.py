"""The regressor run's config, read once into frozen dataclasses (`read_options`); nothing below
the trainer sees the ConfigDict. Also the checks that need files before any work starts."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from recon import objective as objective_lib
from recon.data.sources import DataOptions
from recon.model.build import FlameOptions, ModelOptions
from recon.options import to_dataclass

# Config keys that do not change what is computed: they may differ when a run is resumed.
# `fakes` only says where the files came from (`recon.training.fakes`): their paths are keys.
RESUME_IGNORED_KEYS = ("cache_dir", "coma.cache_dir", "log_every", "eval_every", "image_every",
                       "max_checkpoints", "eval.", "fakes")
TOP_LEVEL_KEYS = ("task", "seed", "cache_dir", "flame", "model", "recognition", "optim", "loss",
                  "data", "coma_checkpoint_dir", "coma", "steps", "log_every",
                  "checkpoint_every", "eval_every", "image_every", "eval_batch_size",
                  "max_checkpoints", "eval", "fakes")


@dataclasses.dataclass(frozen=True)
class OptimOptions:
    """AdamW with linear warm-up and cosine decay; optional global-norm clipping (0 = off).

    backbone_lr_scale: the trainable backbone parts' learning rate relative to the head's
      (pretrained layers are usually fine-tuned more gently than a new head).
    """

    learning_rate: float = 1e-4
    weight_decay: float = 2e-4
    warmup_steps: int = 0
    final_lr_fraction: float = 1.0
    grad_clip_norm: float = 0.0
    backbone_lr_scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class RecognitionOptions:
    """The frozen face-recognition network of DECA's identity term (`config.recognition`).

      network: "none", "dlib" (dlib's face-recognition ResNet, public-domain weights; path ''
        = the file of `face_recognition_models`) or "arcface" (an ArcFace .onnx/.pth at path).
      path: the weights file.
    """

    network: str = "none"
    path: str = ""

    def __post_init__(self):
        if self.network not in ("none", "dlib", "arcface"):
            raise ValueError(f"recognition.network must be 'none', 'dlib' or 'arcface', got "
                             f"{self.network!r}")


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """Extra evaluation during training (`config.eval`).

      now_root: a NoW-layout folder (the download, or a built split): its validation images are
        predicted and scored (non-metrical) every `eval_every` steps and at the end, into
        `evaluation_history.json` (`now_median_mm`, `now_mean_mm`, `now_std_mm`) and the curve
        PNG; '' = off.
      now_split: the split scored ("val": the only one with public scans).
      now_workers: scoring processes (0 = one per CPU, at most 8).
    """

    now_root: str = ""
    now_split: str = "val"
    now_workers: int = 0


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    """Step counts of the host loop (0 switches a periodic action off)."""

    steps: int
    log_every: int
    checkpoint_every: int
    eval_every: int
    image_every: int
    eval_batch_size: int
    max_checkpoints: int = 3


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Everything the regressor trainer reads from its config."""

    seed: int
    cache_dir: str
    loop: LoopOptions
    model: ModelOptions
    optim: OptimOptions
    data: DataOptions
    weights: Any  # recon.objective.LossWeights
    flame: FlameOptions
    recognition: RecognitionOptions
    eval: EvalOptions
    coma_checkpoint_dir: str
    coma: Any  # the configs/coma.py ConfigDict of the 3D-ID encoder (read by its trainer)


def read_options(config) -> RunOptions:
    """The ConfigDict -> `RunOptions` (unknown keys raise naming them; inconsistent options
    raise naming both)."""
    unknown = sorted(set(config.keys()) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ValueError(f"config keys {unknown} are not read by the regressor trainer "
                         f"(known: {sorted(TOP_LEVEL_KEYS)})")
    if config.get("task", "regressor") != "regressor":
        raise ValueError(f"the regressor trainer runs config.task 'regressor', got "
                         f"{config.task!r}")
    loop_keys = ("steps", "log_every", "checkpoint_every", "eval_every", "image_every",
                 "eval_batch_size", "max_checkpoints")
    options = RunOptions(
        seed=int(config.seed), cache_dir=str(config.get("cache_dir", "")),
        loop=to_dataclass({key: config[key] for key in loop_keys if key in config},
                          LoopOptions),
        model=to_dataclass(config.model, ModelOptions, prefix="model"),
        optim=to_dataclass(config.optim, OptimOptions, prefix="optim"),
        data=to_dataclass(config.data, DataOptions, prefix="data"),
        weights=to_dataclass(config.loss, objective_lib.LossWeights, prefix="loss"),
        flame=to_dataclass(config.flame, FlameOptions, prefix="flame"),
        recognition=to_dataclass(config.get("recognition", {}), RecognitionOptions,
                                 prefix="recognition"),
        eval=to_dataclass(config.get("eval", {}), EvalOptions, prefix="eval"),
        coma_checkpoint_dir=str(config.get("coma_checkpoint_dir", "")),
        coma=config.get("coma"))
    data, loop, model = options.data, options.loop, options.model
    if loop.eval_batch_size % data.images_per_subject:
        raise ValueError(f"eval_batch_size {loop.eval_batch_size} must be a multiple of "
                         f"data.images_per_subject {data.images_per_subject} (whole subjects)")
    if (data.num_eval_subjects * data.images_per_subject) % loop.eval_batch_size:
        raise ValueError(f"data.num_eval_subjects x images_per_subject = "
                         f"{data.num_eval_subjects * data.images_per_subject} held-out images "
                         f"must fill whole eval batches of {loop.eval_batch_size}")
    if model.trunk_cache and not (data.source == "synthetic" and data.pool):
        raise ValueError("model.trunk_cache needs data.source='synthetic' and data.pool=True "
                         "(the trunk's features are computed once for the pool)")
    if options.weights.on("identity") and options.recognition.network == "none":
        raise ValueError("loss.identity > 0 needs a face-recognition network: set "
                         "recognition.network ('dlib' or 'arcface') or --config.loss.identity=0.0")
    return options


def check_inputs(options: RunOptions) -> None:
    """Fail before any work when files the config needs are not given or do not exist.

    Raises FileNotFoundError listing every missing entry with the config key that names it.
    """
    missing = []

    def need_file(key: str, value: str, what: str) -> None:
        if not value:
            missing.append(f"{key} is not set: {what}")
        elif not pathlib.Path(value).exists():
            missing.append(f"{key} = {value!r} does not exist: {what}")

    model, data, weights = options.model, options.data, options.weights
    if model.backbone == "iresnet" and (model.trainable == "last_stage" or model.arcface_path):
        need_file("model.arcface_path", model.arcface_path,
                  "ArcFace weights (insightface glintr100.onnx / w600k_r50.onnx or an "
                  "arcface_torch backbone.pth); the paper trains only the last stage of them")
    if model.backbone == "dlib" and model.dlib_path:
        need_file("model.dlib_path", model.dlib_path, "dlib_face_recognition_resnet_model_v1.dat")
    if weights.on("identity") and options.recognition.network == "arcface":
        need_file("recognition.path", options.recognition.path,
                  "the frozen face-recognition network of the identity loss (ArcFace weights), "
                  "or switch the term off with --config.loss.identity=0.0")
    if weights.on("identity") and options.recognition.network == "dlib" and \
            options.recognition.path:
        need_file("recognition.path", options.recognition.path,
                  "dlib_face_recognition_resnet_model_v1.dat")
    if data.source == "mica":
        need_file("data.root", data.root, "the MICA-format dataset root (PAPER.md, 'Data')")
        if not data.names:
            missing.append("data.names is empty: the dataset names under data.root, e.g. "
                           "'(\"FaceWarehouse\", \"LYHM\")'")
        need_file("flame.path", options.flame.path,
                  "MICA's registrations are FLAME 2020 meshes: FLAME 2020 generic_model.pkl")
    for key in ("path", "masks", "texture"):
        value = getattr(options.flame, key)
        if value and not pathlib.Path(value).exists():
            missing.append(f"flame.{key} = {value!r} does not exist")
    flame_path = options.flame.path
    if flame_path and not options.flame.masks and not flame_path.endswith(".npz"):
        missing.append("flame.masks is not set: the vertex loss's face/eye/ear regions "
                       "(FLAME_masks.pkl)")
    renders = objective_lib.needs_render(weights)
    if flame_path and renders and not options.flame.texture and not flame_path.endswith(".npz"):
        missing.append("flame.texture is not set: the 2D losses render the albedo "
                       "(FLAME_texture.npz)")
    if options.coma_checkpoint_dir and not pathlib.Path(options.coma_checkpoint_dir).is_dir():
        missing.append(f"coma_checkpoint_dir = {options.coma_checkpoint_dir!r} does not exist")
    if options.eval.now_root and not pathlib.Path(options.eval.now_root).is_dir():
        missing.append(f"eval.now_root = {options.eval.now_root!r} does not exist")
    if missing:
        raise FileNotFoundError("the config needs files that are not here:\n  - "
                                + "\n  - ".join(missing))
