"""Building the regressor and the FLAME model from their options (the `model` and `flame` parts
of a run's config): used by the trainer and by `recon.inference.load_predictor` alike.

    flame = load_flame(FlameOptions())                       # flame_jax.synthetic()
    model, imported = build_model(ModelOptions(backbone="dlib", trainable="last_stage"),
                                  camera=recon.image.template_camera(crop_spec, flame))

Backbones (`BACKBONES`):
  "iresnet": arcface_torch's IResNet (`recon.model.iresnet`), random or imported ArcFace weights
             (`arcface_path`), input `recon.image.backbone_input(..., "arcface")` (112 px).
  "dlib":    dlib's face-recognition ResNet with its public-domain weights
             (`recon.model.dlib_resnet`, `dlib_path`, default the file of the
             `face_recognition_models` package), input `backbone_input(..., "dlib")` (150 px).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

import flame_jax
from recon.model import dlib_resnet, iresnet
from recon.model import regressor as regressor_lib


@dataclasses.dataclass(frozen=True)
class BackboneInfo:
    """What the rest of the pipeline needs to know about a backbone family.

      input_kind: `recon.image.backbone_input` kind of its input.
      parts: its top-level parameter groups, input to output.
      last_stage: the parts that train with `trainable="last_stage"`.
      trunk_end: the last frozen part with `trainable="last_stage"` (what `trunk_cache` caches).
      always_frozen: parameter paths that never train.
    """

    input_kind: str
    parts: tuple
    last_stage: tuple
    trunk_end: str
    always_frozen: tuple = ()


BACKBONES = {
    "iresnet": BackboneInfo(input_kind="arcface", parts=tuple(iresnet.PART_NAMES),
                            last_stage=tuple(iresnet.TRAINABLE_PREFIXES),
                            trunk_end=iresnet.TRUNK_END,
                            always_frozen=tuple(iresnet.ALWAYS_FROZEN_PATHS)),
    "dlib": BackboneInfo(input_kind="dlib", parts=tuple(dlib_resnet.PART_NAMES),
                         last_stage=tuple(dlib_resnet.LAST_STAGE_PARTS),
                         trunk_end=dlib_resnet.TRUNK_END),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PRECISIONS = {"default": None, "high": jax.lax.Precision.HIGH,
              "highest": jax.lax.Precision.HIGHEST}


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """The regressor (`config.model`).

      backbone: "iresnet" or "dlib" (`BACKBONES`).
      stages, width, embedding_size: the IResNet when it starts from random weights (an
        imported file brings its own; stages must then agree).
      arcface_path: iresnet: ArcFace weights (insightface .onnx, arcface_torch .pth); '' =
        random initialisation.
      dlib_path: dlib: the network file ('' = the one in `face_recognition_models`).
      dlib_output: dlib: what the head reads, "descriptor" (dlib's 128-d embedding) or a level
        ("level2": its 8 x 8 x 128 map, flattened; `recon.model.dlib_resnet.DlibResNet`): the
        network then ends there, and its last stage is that level.
      trainable: "all" (every backbone part; for random initialisation) or "last_stage" (the
        paper's and MICA's: the backbone's last parts + the head).
      last_stage: the backbone parts that train with trainable "last_stage", a tail of its parts
        (() = the backbone's own, `BackboneInfo.last_stage`); the trunk ends before them.
      batch_norm: iresnet: "running" (every BatchNorm uses its running statistics, which never
        change: frozen ArcFace statistics) or "batch" (the trainable parts use batch statistics
        in training and update their running averages; needed from random initialisation).
      trunk_cache: train from the frozen trunk's features, computed once with the training pool
        (needs trainable "last_stage" and `data.pool`): the step then runs only the trainable
        part. Evaluation and prediction always run the whole network on the crop.
      feature_norm: the embedding's normalisation before the head: "l2" (MICA's), "batch" (a
        BatchNorm) or "data" (fixed statistics of the training data's embeddings at
        initialisation, `set_feature_statistics`); see `recon.model.regressor.Regressor`.
      head_hidden_size, head_num_hidden: MICA's mapping head.
      dtype: compute dtype of the backbone and head, "float32", "bfloat16" or "auto" (bfloat16
        on GPU and TPU, float32 on CPU); FLAME, the renderer and the losses stay float32.
      param_dtype: dtype of the parameters ("float32").
      precision: of the backbone's convolutions and dense layers: "default" (the backend's:
        TF32 / bf16 passes on accelerators), "high" or "highest" (exact float32).
    """

    backbone: str = "iresnet"
    stages: tuple = (1, 1, 1, 1)
    width: int = 16
    embedding_size: int = 512
    arcface_path: str = ""
    dlib_path: str = ""
    dlib_output: str = "descriptor"
    trainable: str = "all"
    last_stage: tuple = ()
    batch_norm: str = "running"
    trunk_cache: bool = False
    feature_norm: str = "l2"
    head_hidden_size: int = 300
    head_num_hidden: int = 3
    dtype: str = "float32"
    param_dtype: str = "float32"
    precision: str = "default"

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"model.backbone must be one of {sorted(BACKBONES)}, got "
                             f"{self.backbone!r}")
        if self.trainable not in ("all", "last_stage"):
            raise ValueError(f"model.trainable must be 'all' or 'last_stage', got "
                             f"{self.trainable!r}")
        if self.batch_norm not in ("running", "batch"):
            raise ValueError(f"model.batch_norm must be 'running' or 'batch', got "
                             f"{self.batch_norm!r}")
        if self.batch_norm == "batch" and self.backbone != "iresnet":
            raise ValueError("model.batch_norm='batch' needs the iresnet backbone (dlib's "
                             "network has fixed affine layers, no BatchNorm)")
        if self.arcface_path and self.backbone != "iresnet":
            raise ValueError("model.arcface_path is read only by the iresnet backbone")
        if self.dlib_output not in ("descriptor",) + dlib_resnet.MAP_OUTPUTS:
            raise ValueError(f"model.dlib_output must be 'descriptor' or one of "
                             f"{dlib_resnet.MAP_OUTPUTS}, got {self.dlib_output!r}")
        if self.dlib_output != "descriptor" and self.backbone != "dlib":
            raise ValueError("model.dlib_output is read only by the dlib backbone")
        if self.dlib_path and self.backbone != "dlib":
            raise ValueError("model.dlib_path is read only by the dlib backbone")
        if self.last_stage:
            parts = self.parts
            unknown = [part for part in self.last_stage if part not in parts]
            tail = parts[len(parts) - len(self.last_stage):]
            if unknown or sorted(self.last_stage, key=parts.index) != list(tail) or \
                    len(self.last_stage) == len(parts):
                raise ValueError(f"model.last_stage {tuple(self.last_stage)} must be a tail of "
                                 f"the {self.backbone} backbone's parts {parts} (not all)")
        if self.trunk_cache and self.trainable != "last_stage":
            raise ValueError("model.trunk_cache needs model.trainable='last_stage' (only a frozen "
                             "trunk can be cached)")
        if self.dtype not in (*DTYPES, "auto") or self.param_dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(DTYPES) + ['auto']} and "
                             f"model.param_dtype one of {sorted(DTYPES)}, got {self.dtype!r}, "
                             f"{self.param_dtype!r}")
        if self.feature_norm not in regressor_lib.FEATURE_NORMS:
            raise ValueError(f"model.feature_norm must be one of {regressor_lib.FEATURE_NORMS}, "
                             f"got {self.feature_norm!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"model.precision must be one of {sorted(PRECISIONS)}, got "
                             f"{self.precision!r}")

    @property
    def info(self) -> BackboneInfo:
        return BACKBONES[self.backbone]

    @property
    def input_kind(self) -> str:
        """`recon.image.backbone_input` kind of the network's input."""
        return self.info.input_kind

    @property
    def parts(self) -> tuple:
        """The backbone's parts in use, input to output (a dlib map output ends at its level)."""
        if self.backbone == "dlib" and self.dlib_output != "descriptor":
            parts = self.info.parts
            return parts[:parts.index(self.dlib_output) + 1]
        return self.info.parts

    def default_last_stage(self) -> tuple:
        if self.backbone == "dlib" and self.dlib_output != "descriptor":
            return (self.dlib_output,)
        return self.info.last_stage

    @property
    def trunk_end(self) -> str:
        """The last frozen part with trainable "last_stage" (what `trunk_cache` caches)."""
        parts = self.parts
        last = tuple(self.last_stage) or self.default_last_stage()
        return parts[len(parts) - len(last) - 1]

    def trainable_parts(self) -> tuple:
        """The backbone parts that train."""
        if self.trainable == "all":
            return self.parts
        return tuple(self.last_stage) or self.default_last_stage()

    def compute_dtype(self, platform: Optional[str] = None):
        """The jnp dtype of `dtype` on `platform` (default: JAX's default backend)."""
        if self.dtype == "auto":
            platform = platform or jax.default_backend()
            return jnp.float32 if platform == "cpu" else jnp.bfloat16
        return DTYPES[self.dtype]


@dataclasses.dataclass(frozen=True)
class FlameOptions:
    """The FLAME model (`config.flame`): path '' = the built-in `flame_jax.synthetic()`; else
    `flame_jax.load` of path (FLAME 2020 generic_model.pkl, flame2023_Open.pkl or our .npz) with
    the optional masks (FLAME_masks.pkl: the vertex loss's regions) and texture
    (FLAME_texture.npz: the albedo the 2D losses render) files."""

    path: str = ""
    masks: str = ""
    texture: str = ""


def load_flame(options: FlameOptions) -> flame_jax.FlameModel:
    """The FLAME model of `options` (errors name the file)."""
    if not options.path:
        if options.masks or options.texture:
            raise ValueError("flame.masks / flame.texture need flame.path (the built-in model "
                             "has its own)")
        return flame_jax.synthetic()
    return flame_jax.load(options.path, masks=options.masks or None,
                          texture=options.texture or None)


def build_backbone(options: ModelOptions, *, load_weights: bool = True):
    """(backbone module, imported variables {"params", "batch_stats"} or None).

    load_weights: False builds the architecture only (prediction restores every parameter
    from the checkpoint).
    """
    dtype = options.compute_dtype()
    param_dtype = DTYPES[options.param_dtype]
    precision = PRECISIONS[options.precision]
    if options.backbone == "dlib":
        common = dict(dtype=dtype, param_dtype=param_dtype, precision=precision,
                      output=options.dlib_output)
        if not load_weights:
            return dlib_resnet.DlibResNet(**common), None
        module, variables = dlib_resnet.import_dlib_resnet(options.dlib_path or None)
        if tuple(module.mean_rgb) != tuple(dlib_resnet.DEFAULT_MEAN_RGB):
            # Prediction rebuilds the module without the file: it must not need its means.
            raise ValueError(f"{options.dlib_path or 'the dlib network'} normalises its input "
                             f"with means {module.mean_rgb}, not dlib's "
                             f"{dlib_resnet.DEFAULT_MEAN_RGB}: not supported")
        module = module.clone(**common)
        params = jax.tree.map(lambda a: jnp.asarray(a, param_dtype), variables["params"])
        params = {name: value for name, value in params.items() if name in options.parts}
        return module, {"params": params, "batch_stats": {}}
    imported = None
    if options.arcface_path and load_weights:
        from recon.model.arcface_import import import_arcface

        path = pathlib.Path(options.arcface_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"model.arcface_path {path} does not exist: bring ArcFace weights (insightface "
                f"glintr100.onnx / w600k_r50.onnx or an arcface_torch backbone.pth)")
        found, imported = import_arcface(path)
        in_file = dict(stages=tuple(found.stages), width=found.width,
                       embedding_size=found.embedding_size)
        in_config = dict(stages=tuple(options.stages), width=options.width,
                         embedding_size=options.embedding_size)
        if in_file != in_config:
            raise ValueError(f"{path} holds an IResNet with {in_file}, but the config's model "
                             f"says {in_config}; set --config.model.stages/width/embedding_size "
                             f"to match the file")
    architecture = dict(stages=tuple(options.stages), width=options.width,
                        embedding_size=options.embedding_size)
    train_parts = options.trainable_parts() if options.batch_norm == "batch" else ()
    module = iresnet.IResNet(**architecture, dtype=dtype, param_dtype=param_dtype,
                             precision=precision, batch_norm_train_parts=tuple(train_parts))
    return module, imported


def build_model(options: ModelOptions, *, camera: tuple, features_input: bool = False,
                load_weights: bool = True):
    """(Regressor, imported backbone variables or None).

    camera: the head's starting camera (`recon.image.template_camera`; prediction loads the
    trained head, so any value does there). features_input: the regressor reads
    the frozen trunk's features (`model.trunk_cache` in training) instead of images.
    load_weights: False: no weight file is read (prediction).
    """
    backbone, imported = build_backbone(options, load_weights=load_weights)
    model = regressor_lib.Regressor(
        backbone=backbone, initial_camera=tuple(camera),
        input_kind="features" if features_input else "pixels",
        trunk_end=options.trunk_end if features_input else "",
        feature_norm=options.feature_norm, hidden_size=options.head_hidden_size, num_hidden=options.head_num_hidden,
        dtype=options.compute_dtype())
    return model, imported


def input_shape(options: ModelOptions) -> tuple:
    """(n, n, 3) of the backbone's image input."""
    from recon.image.preprocess import BACKBONE_INPUT_SIZE

    size = BACKBONE_INPUT_SIZE[options.input_kind]
    return (size, size, 3)


def init_variables(model, imported: Optional[dict], seed: int, options: ModelOptions) -> dict:
    """{'params', 'batch_stats'} of a pixel-input regressor; imported backbone variables replace
    the random ones (their shapes must agree). Trunk-features regressors share these."""
    if model.input_kind != "pixels":
        model = model.clone(input_kind="pixels", trunk_end="")
    shape = (1,) + input_shape(options)
    if imported is not None:
        # Only the head is random: initialise it alone (no trace through a deep backbone).
        variables = jax.eval_shape(model.init, jax.random.key(seed), jnp.zeros(shape))
        head = regressor_lib.MappingHead(
            output_offset=tuple(regressor_lib.initial_code_offset(
                model.initial_camera, model.initial_light_band0).tolist()),
            hidden_size=model.hidden_size, num_hidden=model.num_hidden,
            output_init_scale=model.output_init_scale,
            input_norm="none" if model.feature_norm == "l2" else model.feature_norm,
            dtype=model.dtype)
        features = variables["params"][regressor_lib.HEAD_NAME]["hidden_0"]["kernel"].shape[0]
        head_variables = jax.jit(head.init)(jax.random.key(seed), jnp.zeros((1, features)))
        expected = {collection: jax.tree.map(jnp.shape, variables.get(collection, {}).get(
            regressor_lib.BACKBONE_NAME, {})) for collection in ("params", "batch_stats")}
        found = {collection: jax.tree.map(jnp.shape, imported.get(collection) or {})
                 for collection in ("params", "batch_stats")}
        if expected != found:
            raise ValueError("imported backbone variables do not fit the backbone (shapes "
                             "differ)")
        params = {regressor_lib.BACKBONE_NAME: jax.tree.map(jnp.asarray, imported["params"]),
                  regressor_lib.HEAD_NAME: head_variables["params"]}
        batch_stats = {}
        if imported.get("batch_stats"):
            batch_stats[regressor_lib.BACKBONE_NAME] = jax.tree.map(jnp.asarray,
                                                                    imported["batch_stats"])
        if head_variables.get("batch_stats"):
            batch_stats[regressor_lib.HEAD_NAME] = head_variables["batch_stats"]
        return {"params": params, "batch_stats": batch_stats}
    variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros(shape, jnp.float32))
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def set_feature_statistics(model, variables: dict, inputs_batches) -> dict:
    """`variables` with the head's input normalisation set to the mean and variance of the
    embeddings of `inputs_batches` (an iterable of (B, ...) inputs of `model`): the statistics
    of `feature_norm="data"`, computed once at initialisation."""
    embed = jax.jit(lambda v, x: model.apply(v, x, embed_only=True))
    embeddings = np.concatenate([np.asarray(embed(variables, jnp.asarray(inputs)), np.float64)
                                 for inputs in inputs_batches])
    if len(embeddings) < 2:
        raise ValueError("set_feature_statistics needs at least 2 examples")
    stats = dict(variables["batch_stats"])
    head = dict(stats.get(regressor_lib.HEAD_NAME, {}))
    head["input_norm"] = {"mean": jnp.asarray(embeddings.mean(0), jnp.float32),
                          "var": jnp.asarray(embeddings.var(0), jnp.float32)}
    stats[regressor_lib.HEAD_NAME] = head
    return {**variables, "batch_stats": stats}


def trainable_labels(params: dict, options: ModelOptions) -> Any:
    """"trainable"/"frozen" labels of a regressor's params under `options`."""
    return regressor_lib.trainable_labels(params, trainable_parts=options.trainable_parts(),
                                          always_frozen=options.info.always_frozen)
