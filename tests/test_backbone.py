"""recon.model: IResNet, ArcFace import against onnxruntime, torch zip reading.

References: onnxruntime running ONNX graphs built here with onnx.helper (folded and unfolded
BatchNorm, numeric tensor names). (The backbone input and the crops: tests/test_image.py.)
Tolerance for embeddings: max |ours - ref| / max |ref|
<= 1e-4 (the import contract).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _onnx_models import (onnx_from_state_dict, random_state_dict, run_onnxruntime,
                          write_malicious_torch_zip, write_torch_zip)
from recon import model as backbone
from recon.model import (ArcFaceImportError, IResNet, TorchCheckpointError, import_arcface,
                         variables_from_state_dict)

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

STAGES, WIDTH, EMBEDDING = (2, 1, 1, 2), 8, 32  # blocks with and without downsample
ARCH = {"stages": STAGES, "width": WIDTH, "embedding_size": EMBEDDING}


def relative_error(ours, reference):
    return float(np.abs(np.asarray(ours) - reference).max() / np.abs(reference).max())


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, variables, images):
    return module.apply(variables, images)


@pytest.fixture(scope="module")
def state():
    return random_state_dict(STAGES, WIDTH, EMBEDDING, seed=0)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).uniform(-1, 1, (2, 112, 112, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(state, images):
    """onnxruntime's embeddings of the unfolded export of `state`."""
    return run_onnxruntime(onnx_from_state_dict(state, STAGES, fold_bn=False), images)


@pytest.fixture(scope="module")
def imported(state):
    return variables_from_state_dict(state)


@pytest.fixture(scope="module")
def tiny():
    """A (1, 1, 1, 1) width-4 IResNet with random weights, for the (compile-heavy) train tests."""
    return variables_from_state_dict(random_state_dict((1, 1, 1, 1), 4, 8, seed=5))


# ------------------------------------------------------------------------------- ONNX import


@pytest.mark.parametrize("fold_bn,prelu_layout,fc_as_matmul,dropout", [
    (True, "c11", False, False),   # what insightface ships: BN folded into convs, Gemm
    (False, "1c11", True, True),   # BN nodes kept, MatMul + Add fc, an Identity in between
])
def test_onnx_import_matches_onnxruntime(tmp_path, state, images, fold_bn, prelu_layout,
                                         fc_as_matmul, dropout):
    model = onnx_from_state_dict(state, STAGES, fold_bn=fold_bn, prelu_layout=prelu_layout,
                                 fc_as_matmul=fc_as_matmul, dropout=dropout)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    module, variables = import_arcface(path)
    assert (tuple(module.stages), module.width, module.embedding_size) == (STAGES, WIDTH,
                                                                           EMBEDDING)
    expected = run_onnxruntime(model, images)
    ours = _apply(module, variables, jnp.asarray(images))
    assert ours.shape == (2, EMBEDDING)
    assert relative_error(ours, expected) <= 1e-4


def test_onnx_unfolded_places_every_tensor_where_torch_had_it(state):
    recovered = backbone.state_dict_from_onnx(onnx_from_state_dict(state, STAGES, fold_bn=False))
    expected = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert sorted(recovered) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(recovered[key].reshape(value.shape), value, rtol=0,
                                   atol=1e-7, err_msg=key)


def test_onnx_extra_tensor_is_named(state):
    model = onnx_from_state_dict(state, STAGES, fold_bn=True)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(3, np.float32), "9999"))
    with pytest.raises(ArcFaceImportError, match="unused.*'9999'"):
        backbone.state_dict_from_onnx(model)


def test_onnx_misplaced_tensor_is_named(state):
    model = onnx_from_state_dict(state, STAGES, fold_bn=True)
    prelus = [n for n in model.graph.node if n.op_type == "PRelu"]
    # give stage 2's PRelu (16 channels) the stem's 8-channel slope
    wrong = prelus[0].input[1]
    target = next(n for n in prelus if np.prod(_initializer(model, n.input[1]).shape) == 16)
    target.input[1] = wrong
    with pytest.raises(ArcFaceImportError, match=f"tensor '{wrong}'.*shape \\(8, 1, 1\\)"):
        backbone.state_dict_from_onnx(model)


def test_onnx_foreign_op_is_named(state):
    model = onnx_from_state_dict(state, STAGES, fold_bn=True)
    nodes = list(model.graph.node)
    stem_prelu = next(n for n in nodes if n.op_type == "PRelu")
    relu = onnx.helper.make_node("Relu", [stem_prelu.output[0]], ["relu_out"], name="MyRelu")
    for node in nodes:  # everything that read the PRelu now reads the Relu
        for i, name in enumerate(node.input):
            if name == stem_prelu.output[0]:
                node.input[i] = "relu_out"
    model.graph.node.insert(nodes.index(stem_prelu) + 1, relu)
    with pytest.raises(ArcFaceImportError, match="MyRelu"):
        backbone.state_dict_from_onnx(model)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        import_arcface(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07 this is not protobuf \xff\xff\xff")
    with pytest.raises(ArcFaceImportError, match="garbage.onnx"):
        import_arcface(garbage)
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.")  # torch < 1.6 magic
    with pytest.raises(TorchCheckpointError, match="legacy.pth.*not a zip"):
        import_arcface(legacy)


def _initializer(model, name):
    return next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


# ------------------------------------------------------------------------- torch .pth import


def test_pth_state_dict_reads_without_torch(tmp_path, state, images, reference):
    path = tmp_path / "backbone.pth"
    prefixed = {f"module.{k}": v for k, v in state.items()}  # DDP-saved checkpoints
    write_torch_zip(path, prefixed, strided_keys=("module.fc.weight",))
    loaded = backbone.load_torch_state_dict(path)
    assert sorted(loaded) == sorted(prefixed)
    for key, value in prefixed.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    module, variables = import_arcface(path)
    assert relative_error(_apply(module, variables, jnp.asarray(images)), reference) <= 1e-4


@pytest.fixture(params=["shared", "local"])
def unpickler(request, monkeypatch):
    """Run with flame_jax.safe_pickle and with torch_zip's own fallback unpickler."""
    from recon.model import torch_zip

    if request.param == "local":
        monkeypatch.setattr(torch_zip, "_shared_unpickle", None)
    elif torch_zip._shared_unpickle is None:
        pytest.skip("flame_jax.safe_pickle (with persistent_load) is not in this checkout")
    return request.param


def test_pth_malicious_pickle_runs_nothing(tmp_path, unpickler, state):
    path = tmp_path / "good.pth"
    write_torch_zip(path, state)
    loaded = backbone.load_torch_state_dict(path)
    assert all(np.array_equal(loaded[k], v) for k, v in state.items())
    sentinel = tmp_path / "sentinel"
    path = tmp_path / "evil.pth"
    write_malicious_torch_zip(path, sentinel)
    with pytest.raises(TorchCheckpointError, match="forbidden global .*mkdir"):
        import_arcface(path)
    assert not sentinel.exists()


def test_state_dict_wrong_keys_and_shapes_are_named(state):
    missing = {k: v for k, v in state.items() if k != "layer4.1.bn3.running_var"}
    with pytest.raises(ArcFaceImportError, match="missing \\['layer4.1.bn3.running_var'\\]"):
        variables_from_state_dict(missing)
    extra = {**state, "head.kernel": np.zeros(3, np.float32)}
    with pytest.raises(ArcFaceImportError, match="unexpected \\['head.kernel'\\]"):
        variables_from_state_dict(extra)
    wrong = {**state, "layer2.0.prelu.weight": np.zeros(5, np.float32)}
    with pytest.raises(ArcFaceImportError, match="layer2.0.prelu.weight has shape \\(5,\\)"):
        variables_from_state_dict(wrong)
    nan = {**state, "fc.bias": np.full(EMBEDDING, np.nan, np.float32)}
    with pytest.raises(ArcFaceImportError, match="fc.bias holds non-finite"):
        variables_from_state_dict(nan)


# ------------------------------------------------------------------------------ the module


def test_init_matches_imported_structure(imported):
    module, variables = imported
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 112, 112, 3), jnp.float32))
    as_shapes = jax.tree_util.tree_map(lambda x: x.shape, variables)
    assert jax.tree_util.tree_map(lambda x: x.shape, dict(shapes)) == as_shapes
    assert set(variables["params"]) == {"stem", "stage1", "stage2", "stage3", "stage4", "output"}
    assert set(variables["params"]["stage1"]) == {"block0", "block1"}


def test_presets_and_input_check():
    assert backbone.iresnet18().stages == (2, 2, 2, 2)
    assert backbone.iresnet34().stages == (3, 4, 6, 3)
    assert backbone.iresnet50().stages == (3, 4, 14, 3)
    assert backbone.iresnet100().stages == (3, 13, 30, 3)
    out = jax.eval_shape(lambda x: backbone.iresnet100().init_with_output(
        jax.random.PRNGKey(0), x)[0], jax.ShapeDtypeStruct((2, 112, 112, 3), jnp.float32))
    assert out.shape == (2, 512)
    with pytest.raises(ValueError, match="112, 112, 3"):
        jax.eval_shape(IResNet.small().init, jax.random.PRNGKey(0),
                       jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))


def test_train_mode_keeps_frozen_batch_stats(tiny, images):
    module, variables = tiny
    x = jnp.asarray(images)

    @functools.partial(jax.jit, static_argnums=0)
    def train_apply(module, variables, x):
        return module.apply(variables, x, train=True, mutable=["batch_stats"])

    eval_out = _apply(module, variables, x)
    out, updates = train_apply(module, variables, x)
    np.testing.assert_array_equal(out, eval_out)  # default: eval-mode BatchNorm everywhere
    jax.tree_util.tree_map(np.testing.assert_array_equal, updates["batch_stats"],
                           variables["batch_stats"])

    partial = module.clone(batch_norm_train_parts=("stage4", "output"))
    _, updates = train_apply(partial, variables, x)
    for part, stats in updates["batch_stats"].items():
        changed = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
            lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), stats,
            variables["batch_stats"][part]))
        assert all(changed) if part in ("stage4", "output") else not any(changed), part


def test_labels_and_one_optimizer_step(tiny, images):
    module, variables = tiny
    params = variables["params"]
    labels = backbone.backbone_trainable_labels(params)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): label
            for path, label in jax.tree_util.tree_leaves_with_path(labels)}
    assert flat["output/features/scale"] == "frozen"  # arcface_torch fixes it to 1
    for name, label in flat.items():
        expected = name.split("/")[0] in ("stage4", "output") and name != "output/features/scale"
        assert (label == "trainable") == expected, name

    optimizer = optax.multi_transform({"trainable": optax.sgd(0.1),
                                       "frozen": optax.set_to_zero()}, labels)

    @jax.jit
    def step(params, x):
        def loss(p):
            return jnp.mean(module.apply({**variables, "params": p}, x) ** 2)

        grads = jax.grad(loss)(params)
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        return optax.apply_updates(params, updates), grads

    new, grads = step(params, jnp.asarray(images))
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                   new, params)
    for path, did_move in jax.tree_util.tree_leaves_with_path(moved):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        assert did_move == (flat[name] == "trainable"), name
