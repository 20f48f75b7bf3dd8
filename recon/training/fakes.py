"""Stand-ins for the licensed files of the paper's setting, written here with no download.

    paths = make_paper_fakes("runs/paper_smoke/fakes")   # once; reused when already written
    apply_fakes(config, paths)                           # configs/paper.py now runs end to end

`python train.py --config configs/paper.py:smoke` does both (`config.fakes = "paper"`), so the
paper's whole path (FLAME 2020 pickle, masks and texture files, ArcFace ONNX import, MICA-format
data with landmark files, IResNet with a frozen trunk, identity and 3D-ID losses) runs in about a
minute on a CPU. The files are in the official formats, with made-up content:

  * FLAME: `generic_model.pkl` as FLAME 2020 ships it (a Python-2 protocol-2 pickle whose arrays
    are chumpy `Ch` objects and whose `J_regressor` is a scipy CSC matrix) holding the arrays of
    `flame_jax.synthetic()`; `FLAME_masks.pkl` (its masks) and `FLAME_texture.npz` (its albedo,
    each vertex at its own texel, so `flame_jax.load` gives back the same per-vertex albedo).
  * ArcFace: an ONNX IResNet in arcface_torch's export layout (`ARCFACE_STAGES`, width
    `ARCFACE_WIDTH`, 512-d embedding, random weights and BatchNorm statistics; BatchNorm folded
    into the convs as insightface ships it), read by `recon.model.import_arcface`.
  * MICA: `root/NAME/{arcface_input, FLAME_parameters, registrations}` and
    `root/image_paths/NAME.npy` (`recon.data.mica`'s layout) whose images are renders of
    synthetic heads in MICA's crop (`recon.data.synthetic` with `mica.MICA_CROP`); the renders'
    exact landmarks are stored as the dataset's own landmark files (`provided_landmarks/`) and
    converted into `landmarks_68/` by `recon.data.prepare_mica`, so no detector is needed.

The writers of Python-2 pickles and ArcFace ONNX graphs live here for the library and are
imported back by the tests (`tests/pickle_writers.py`, `tests/_onnx_models.py`).
"""

from __future__ import annotations

import json
import pathlib
import pickle
import shutil
import struct
import tempfile
from typing import Dict

import cv2
import numpy as np
import scipy.sparse

import flame_jax
from flame_jax.fileio import atomic_write, write_mesh
from flame_jax.model import FLAME_PARENTS
from recon.data import augment, mica, prepare_mica, synthetic
from recon.image import preprocess

MANIFEST = "fakes.json"
FAKES_FORMAT = "recon.training.fakes/1"
# The fake MICA tree: two datasets of two actors with three images each.
MICA_NAMES = ("FAKE_SCANS_A", "FAKE_SCANS_B")
ACTORS_PER_NAME = 2
IMAGES_PER_ACTOR = 3
# The fake ArcFace network (IResNet-100 is (3, 13, 30, 3), width 64).
ARCFACE_STAGES = (1, 1, 1, 1)
ARCFACE_WIDTH = 8
ARCFACE_EMBEDDING = 512
BN_EPS = 1e-5


# ---------------------------------------------------------------------------------------------
# Python-2 pickles: FLAME 2020's generic_model.pkl and FLAME_masks.pkl
# ---------------------------------------------------------------------------------------------


class Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote: `bytes`/`str` as py2 `str` (BINSTRING) and the old
    module names `numpy.core.multiarray` / `scipy.sparse.csc`, so loading needs latin1. A class
    with a `pickled_as = (module, name)` attribute is written under that global name."""

    renames = {"numpy._core.multiarray": "numpy.core.multiarray",
               "scipy.sparse._csc": "scipy.sparse.csc"}
    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", None)
        target = obj.__dict__.get("pickled_as") if isinstance(obj, type) else None
        if target is None and module in self.renames:
            target = (self.renames[module], obj.__name__)
        if target is not None:
            self.write(pickle.GLOBAL + f"{target[0]}\n{target[1]}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


def write_py2_pickle(obj, path, protocol: int = 2) -> None:
    """`obj` pickled as Python 2's cPickle would, written atomically to `path`."""
    def write(handle):
        Py2Pickler(handle, protocol=protocol).dump(obj)

    atomic_write(pathlib.Path(path), write)


class ChumpyArray:
    """Pickles as a plain chumpy `Ch` holding `x` (float64), as FLAME 2020's arrays are stored;
    chumpy itself is never imported (the class is written under the name `chumpy.ch.Ch`)."""

    pickled_as = ("chumpy.ch", "Ch")

    def __init__(self, x):
        self.x = np.asarray(x, np.float64)

    def __getstate__(self):
        return {"x": self.x, "_dirty_vars": set(), "_itr": None, "_depends_on_deps": {},
                "_make_dense": False, "_make_sparse": False}


def official_flame_dict(model: flame_jax.FlameModel) -> dict:
    """The keys and layouts of FLAME 2020's generic_model.pkl holding `model`'s arrays
    (the model needs 300 identity components, FLAME's layout: identity then expression)."""
    if model.num_shape != 300:
        raise ValueError(f"the official layout has 300 identity components; the model has "
                         f"{model.num_shape}")
    v_template = np.asarray(model.v_template, np.float64)
    num_vertices = v_template.shape[0]
    shapedirs = np.concatenate([np.asarray(model.shapedirs, np.float64),
                                np.asarray(model.exprdirs, np.float64)], axis=-1)
    # Ours: (36, V * 3) so that pose_feature @ posedirs; official: (V, 3, 36).
    posedirs = np.asarray(model.posedirs, np.float64).T.reshape(num_vertices, 3, -1)
    j_regressor = np.asarray(model.j_regressor, np.float64)
    parents = np.asarray(FLAME_PARENTS, np.int64)
    parents[0] = 4294967295  # the root's parent as the official files store it
    return {
        "v_template": v_template,
        "f": np.asarray(model.faces, np.uint32),
        "shapedirs": shapedirs,
        "posedirs": posedirs,
        "weights": np.asarray(model.lbs_weights, np.float64),
        "J_regressor": scipy.sparse.csc_matrix(j_regressor),
        "kintree_table": np.stack([parents, np.arange(len(FLAME_PARENTS))]).astype(np.int64),
        "J": j_regressor @ v_template,
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }


def write_flame_2020(model: flame_jax.FlameModel, path) -> pathlib.Path:
    """`model` as FLAME 2020's generic_model.pkl (chumpy arrays, Python-2 pickle)."""
    data = official_flame_dict(model)
    for key in ("v_template", "shapedirs", "weights"):  # chumpy in the 2020 file
        data[key] = ChumpyArray(data[key])
    write_py2_pickle(data, path)
    return pathlib.Path(path)


def write_flame_masks(model: flame_jax.FlameModel, path) -> pathlib.Path:
    """`model.masks` as FLAME_masks.pkl ({name: vertex indices}, Python-2 pickle)."""
    if not model.masks:
        raise ValueError("the model has no masks to write")
    write_py2_pickle({name: np.asarray(ids, np.int64) for name, ids in model.masks.items()},
                     path)
    return pathlib.Path(path)


def write_flame_texture(model: flame_jax.FlameModel, path) -> pathlib.Path:
    """`model`'s per-vertex albedo as FLAME_texture.npz (`mean` (H, W, 3) and `tex_dir`
    (H, W, 3, n) in 0..255, BGR, `vt`, `ft`): vertex v gets texel v of a square texture and every
    triangle corner its vertex's texel centre, so `flame_jax.load(texture=path)` returns the
    model's albedo again (bilinear lookups at texel centres)."""
    if model.albedo_mean is None:
        raise ValueError("the model has no albedo to write")
    mean = np.asarray(model.albedo_mean, np.float64)
    basis = np.asarray(model.albedo_basis, np.float64)
    num_vertices = mean.shape[0]
    side = int(np.ceil(np.sqrt(num_vertices)))
    rows, cols = np.divmod(np.arange(num_vertices), side)
    vt = np.stack([(cols + 0.5) / side, 1.0 - (rows + 0.5) / side], axis=-1)
    texture_mean = np.zeros((side, side, 3))
    texture_basis = np.zeros((side, side, 3, basis.shape[-1]))
    texture_mean[rows, cols] = mean[:, ::-1] * 255.0
    texture_basis[rows, cols] = basis[:, ::-1] * 255.0
    atomic_write(pathlib.Path(path), lambda handle: np.savez(
        handle, mean=texture_mean.astype(np.float32), tex_dir=texture_basis.astype(np.float32),
        vt=vt, ft=np.asarray(model.faces, np.int64)))
    return pathlib.Path(path)


# ---------------------------------------------------------------------------------------------
# ArcFace: arcface_torch state dicts and their ONNX export, without torch
# ---------------------------------------------------------------------------------------------


def block_keys(stages):
    """(arcface_torch block prefix "layer<s>.<b>", whether it is its stage's first block)."""
    for stage, blocks in enumerate(stages, start=1):
        for block in range(blocks):
            yield f"layer{stage}.{block}", block == 0


def random_state_dict(stages, width, embedding_size, seed=0):
    """{arcface_torch key: float32 array (int64 num_batches_tracked)} with random weights."""
    rng = np.random.default_rng(seed)
    state = {}

    def conv(key, out_c, in_c, k):
        state[f"{key}.weight"] = (rng.standard_normal((out_c, in_c, k, k))
                                  * np.sqrt(2.0 / (in_c * k * k))).astype(np.float32)

    def bn(key, c):
        state[f"{key}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        state[f"{key}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
        state[f"{key}.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
        state[f"{key}.running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        state[f"{key}.num_batches_tracked"] = np.array(1000, np.int64)

    def prelu(key, c):
        state[f"{key}.weight"] = rng.uniform(0.1, 0.3, c).astype(np.float32)

    conv("conv1", width, 3, 3)
    bn("bn1", width)
    prelu("prelu", width)
    channels = width
    for key, first in block_keys(stages):
        stage = int(key[5])
        planes = width * 2 ** (stage - 1)
        bn(f"{key}.bn1", channels)
        conv(f"{key}.conv1", planes, channels, 3)
        bn(f"{key}.bn2", planes)
        prelu(f"{key}.prelu", planes)
        conv(f"{key}.conv2", planes, planes, 3)
        bn(f"{key}.bn3", planes)
        if first:
            conv(f"{key}.downsample.0", planes, channels, 1)
            bn(f"{key}.downsample.1", planes)
        channels = planes
    bn("bn2", channels)
    fan_in = channels * 49
    state["fc.weight"] = (rng.standard_normal((embedding_size, fan_in))
                          / np.sqrt(fan_in)).astype(np.float32)
    state["fc.bias"] = rng.normal(0, 0.1, embedding_size).astype(np.float32)
    bn("features", embedding_size)
    return state


class _OnnxBuilder:
    def __init__(self, state, seed):
        self.state = state
        self.nodes, self.initializers = [], []
        self.counter = 0
        self.rng = np.random.default_rng(seed)

    def name(self):
        self.counter += 1
        return str(self.counter + 100)

    def tensor(self, array):
        from onnx import numpy_helper

        name = self.name()
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op, inputs, **attrs):
        from onnx import helper

        out = self.name()
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op}_{len(self.nodes)}",
                                           **attrs))
        return out

    def bn(self, x, key):
        s = self.state
        return self.node("BatchNormalization",
                         [x] + [self.tensor(s[f"{key}.{f}"]) for f in
                                ("weight", "bias", "running_mean", "running_var")],
                         epsilon=BN_EPS, momentum=0.9)

    def conv_bn(self, x, conv_key, bn_key, stride, fold):
        weight = self.state[f"{conv_key}.weight"].astype(np.float64)
        k = weight.shape[-1]
        pad = (k - 1) // 2
        attrs = dict(kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4,
                     dilations=[1, 1], group=1)
        if not fold:
            out = self.node("Conv", [x, self.tensor(weight.astype(np.float32))], **attrs)
            return self.bn(out, bn_key)
        s = self.state
        factor = s[f"{bn_key}.weight"] / np.sqrt(s[f"{bn_key}.running_var"].astype(np.float64)
                                                  + BN_EPS)
        folded = (weight * factor[:, None, None, None]).astype(np.float32)
        bias = (s[f"{bn_key}.bias"] - s[f"{bn_key}.running_mean"] * factor).astype(np.float32)
        return self.node("Conv", [x, self.tensor(folded), self.tensor(bias)], **attrs)

    def prelu(self, x, key, layout):
        slope = self.state[f"{key}.weight"]
        slope = slope.reshape((-1, 1, 1) if layout == "c11" else (1, -1, 1, 1))
        return self.node("PRelu", [x, self.tensor(slope)])


def onnx_from_state_dict(state, stages, *, fold_bn, prelu_layout="c11", fc_as_matmul=False,
                         dropout=False, seed=0):
    """ONNX ModelProto of arcface_torch IResNet(stages) holding `state`'s weights: the graph
    torch.onnx.export produces (numeric tensor names, NCHW input), each conv's following
    BatchNorm folded into the conv (`fold_bn=True`, what insightface ships) or kept.

    Input 'input.1' (N, 3, 112, 112), output the (N, embedding) features. Initializers get
    numeric names and are stored in shuffled order (nothing may depend on either).
    """
    import onnx
    from onnx import helper

    b = _OnnxBuilder(state, seed)
    x = b.conv_bn("input.1", "conv1", "bn1", 1, fold_bn)
    x = b.prelu(x, "prelu", prelu_layout)
    for key, first in block_keys(stages):
        identity = x
        out = b.bn(x, f"{key}.bn1")
        out = b.conv_bn(out, f"{key}.conv1", f"{key}.bn2", 1, fold_bn)
        out = b.prelu(out, f"{key}.prelu", prelu_layout)
        out = b.conv_bn(out, f"{key}.conv2", f"{key}.bn3", 2 if first else 1, fold_bn)
        if first:  # torch runs the downsample after the main branch
            identity = b.conv_bn(x, f"{key}.downsample.0", f"{key}.downsample.1", 2, fold_bn)
        x = b.node("Add", [out, identity])
    x = b.bn(x, "bn2")
    x = b.node("Flatten", [x], axis=1)
    if dropout:
        x = b.node("Identity", [x])
    if fc_as_matmul:
        x = b.node("MatMul", [x, b.tensor(state["fc.weight"].T.copy())])
        x = b.node("Add", [x, b.tensor(state["fc.bias"])])
    else:
        x = b.node("Gemm", [x, b.tensor(state["fc.weight"]), b.tensor(state["fc.bias"])],
                   alpha=1.0, beta=1.0, transB=1)
    x = b.bn(x, "features")
    order = b.rng.permutation(len(b.initializers))
    initializers = [b.initializers[i] for i in order]
    embedding = state["fc.weight"].shape[0]
    graph = helper.make_graph(
        b.nodes, "iresnet",
        [helper.make_tensor_value_info("input.1", onnx.TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, ["N", embedding])],
        initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_arcface_onnx(path, *, stages=ARCFACE_STAGES, width: int = ARCFACE_WIDTH,
                       embedding_size: int = ARCFACE_EMBEDDING, seed: int = 0) -> pathlib.Path:
    """A random ArcFace IResNet as insightface ships it (ONNX, BatchNorm folded)."""
    state = random_state_dict(stages, width, embedding_size, seed=seed)
    model = onnx_from_state_dict(state, stages, fold_bn=True, seed=seed)
    atomic_write(pathlib.Path(path), model.SerializeToString())
    return pathlib.Path(path)


# ---------------------------------------------------------------------------------------------
# A MICA-format tree of rendered synthetic heads
# ---------------------------------------------------------------------------------------------

PROVIDED_LANDMARKS = "provided_landmarks"


def _save_object(path: pathlib.Path, value) -> None:
    array = np.empty((), dtype=object)
    array[()] = value
    atomic_write(path, lambda handle: np.save(handle, array, allow_pickle=True))


def write_mica_tree(root, model: flame_jax.FlameModel, *, names=MICA_NAMES,
                    actors_per_name: int = ACTORS_PER_NAME,
                    images_per_actor: int = IMAGES_PER_ACTOR, seed: int = 0,
                    show_progress: bool = False) -> Dict[str, Dict[str, np.ndarray]]:
    """Write MICA-format datasets `names` under `root` whose images are renders of synthetic
    heads in MICA's crop; returns {name: {actor: shape coefficients (300,)}}.

    Per actor: `FLAME_parameters/<actor>/params.npz` (`betas` (400,): the head's 300 identity
    coefficients then 100 zero expression coefficients; `pose` (15,) zeros),
    `registrations/<actor>/mesh.obj` (its neutral mesh, metres), `arcface_input/<actor>/
    image_<i>.jpg` (224 x 224) with MICA's ArcFace blob `.npy` beside it, and the renders' exact
    landmarks as the dataset's own files `<name>/provided_landmarks/<actor>/image_<i>.txt`,
    converted into `landmarks_68/` by `recon.data.prepare_mica`.
    """
    root = pathlib.Path(root)
    config = synthetic.SyntheticConfig(crop=mica.MICA_CROP, image_size=mica.MICA_CROP.size,
                                       augment=augment.AugmentConfig.clean())
    host = synthetic.HostModel.from_model(model)
    count = len(names) * actors_per_name
    subjects = list(range(count))
    images = list(range(images_per_actor))
    rendered = synthetic.make_subjects(model, config, subjects, images, seed, host=host)
    (root / "image_paths").mkdir(parents=True, exist_ok=True)
    shapes: Dict[str, Dict[str, np.ndarray]] = {}
    for n, name in enumerate(names):
        table, shapes[name] = {}, {}
        for a in range(actors_per_name):
            subject = n * actors_per_name + a
            example = rendered[subject]
            shape = np.asarray(synthetic.sample_scenes(host, config, subject, images[:1],
                                                       seed).shape[0], np.float32)
            actor = f"actor_{a:02d}"
            npz = f"{actor}/params.npz"
            params_path = root / name / mica.FLAME_FOLDER / npz
            params_path.parent.mkdir(parents=True, exist_ok=True)
            betas = np.concatenate([shape, np.zeros(100, np.float32)])
            atomic_write(params_path, lambda handle, b=betas: np.savez(
                handle, betas=b, pose=np.zeros(15, np.float32)))
            mesh_path = root / name / mica.REGISTRATION_FOLDER / actor / "mesh.obj"
            mesh_path.parent.mkdir(parents=True, exist_ok=True)
            write_mesh(mesh_path, example["vertices"][0], np.asarray(model.faces))
            listed = []
            for i in images:
                relative = f"{actor}/image_{i:03d}.jpg"
                image_path = root / name / mica.IMAGE_FOLDER / relative
                image_path.parent.mkdir(parents=True, exist_ok=True)
                pixels = np.round(np.clip(example["crops"][i], 0, 1) * 255).astype(np.uint8)
                ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR),
                                           [cv2.IMWRITE_JPEG_QUALITY, 95])
                if not ok:
                    raise RuntimeError(f"{image_path}: JPEG encoding failed")
                atomic_write(image_path, encoded.tobytes())
                blob = preprocess.backbone_input(pixels[None], "arcface", max_value=255.0)[0]
                atomic_write(image_path.with_suffix(".npy"), lambda handle, b=blob: np.save(
                    handle, b.transpose(2, 0, 1).astype(np.float32)))
                provided = (root / name / PROVIDED_LANDMARKS / relative).with_suffix(".txt")
                provided.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(provided, "".join(f"{x:.4f} {y:.4f}\n"
                                               for x, y in example["landmarks"][i]))
                listed.append(relative)
            table[actor] = (listed, npz)
            shapes[name][actor] = shape
        _save_object(root / "image_paths" / f"{name}.npy", table)
    reports = prepare_mica.prepare(root, list(names),
                                   from_landmarks=root / "{name}" / PROVIDED_LANDMARKS,
                                   show_progress=show_progress)
    failed = {report.name: report.failures for report in reports if report.failures}
    if failed:
        raise RuntimeError(f"fake MICA tree: landmark conversion failed: {failed}")
    return shapes


# ---------------------------------------------------------------------------------------------
# Everything configs/paper.py needs
# ---------------------------------------------------------------------------------------------


def make_paper_fakes(folder, *, seed: int = 0, show_progress: bool = True) -> Dict[str, object]:
    """Write the paper setting's files (module docstring) into `folder` once; returns
    {"flame", "masks", "texture", "arcface", "mica_root": paths, "mica_names": tuple,
    "arcface_stages", "arcface_width", "arcface_embedding_size"}.

    A folder that already holds a complete set (its `fakes.json`, written last, naming this
    format and seed) is reused as it is; otherwise the set is written into a temporary folder
    beside it and moved into place, so a killed run never leaves half a set.
    """
    folder = pathlib.Path(folder).absolute()
    manifest_path = folder / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("format") == FAKES_FORMAT and manifest.get("seed") == seed:
            return _paths(folder, manifest)
        raise ValueError(f"{folder} holds fakes of another format or seed "
                         f"({manifest.get('format')}, seed {manifest.get('seed')}); remove it")
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists without {MANIFEST}: not a set of fakes; remove "
                              f"it or choose another folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        model = flame_jax.synthetic()
        write_flame_2020(model, staging / "generic_model.pkl")
        write_flame_masks(model, staging / "FLAME_masks.pkl")
        write_flame_texture(model, staging / "FLAME_texture.npz")
        write_arcface_onnx(staging / "arcface_r8.onnx", seed=seed)
        write_mica_tree(staging / "mica", model, seed=seed, show_progress=show_progress)
        manifest = {"format": FAKES_FORMAT, "seed": seed, "flame": "generic_model.pkl",
                    "masks": "FLAME_masks.pkl", "texture": "FLAME_texture.npz",
                    "arcface": "arcface_r8.onnx", "mica_root": "mica",
                    "mica_names": list(MICA_NAMES), "arcface_stages": list(ARCFACE_STAGES),
                    "arcface_width": ARCFACE_WIDTH, "arcface_embedding_size": ARCFACE_EMBEDDING}
        atomic_write(staging / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        if folder.exists():
            folder.rmdir()  # empty (checked above)
        staging.rename(folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return _paths(folder, manifest)


def _paths(folder: pathlib.Path, manifest: dict) -> Dict[str, object]:
    paths = {key: str(folder / manifest[key])
             for key in ("flame", "masks", "texture", "arcface", "mica_root")}
    missing = [value for value in paths.values() if not pathlib.Path(value).exists()]
    if missing:
        raise FileNotFoundError(f"{folder}: incomplete fakes, missing {missing}; remove the "
                                f"folder to write them again")
    paths.update(mica_names=tuple(manifest["mica_names"]),
                 arcface_stages=tuple(manifest["arcface_stages"]),
                 arcface_width=int(manifest["arcface_width"]),
                 arcface_embedding_size=int(manifest["arcface_embedding_size"]))
    return paths


def apply_fakes(config, paths: Dict[str, object]) -> None:
    """Point `config` (configs/paper.py) at the fakes of `make_paper_fakes`: the ArcFace file
    and its architecture, the recognition network, the FLAME files and the MICA data. Sets
    existing keys only, so it works on a locked config."""
    config.model.arcface_path = paths["arcface"]
    config.model.stages = tuple(paths["arcface_stages"])
    config.model.width = paths["arcface_width"]
    config.model.embedding_size = paths["arcface_embedding_size"]
    config.recognition.path = paths["arcface"]
    config.flame.path = paths["flame"]
    config.flame.masks = paths["masks"]
    config.flame.texture = paths["texture"]
    config.data.root = paths["mica_root"]
    config.data.names = tuple(paths["mica_names"])
