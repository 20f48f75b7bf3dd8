"""flame_jax.io: official FLAME files without chumpy/torch, our npz, aux files, hostile input.

Official-format files are written here in the official layouts (real FLAME topology from the
shipped asset, random values of the official shapes), including a chumpy-style Python-2 pickle
written through a stand-in `chumpy` module that is removed again before loading.
"""

import os
import pickle
import sys

import cv2
import numpy as np
import pytest
import scipy.sparse
from pickle_writers import fake_chumpy, write_py2_pickle  # noqa: F401 (fake_chumpy: fixture)

import flame_jax.io as fio
from flame_jax.model import FLAME_PARENTS, to_numpy

V, F = 5023, 9976


# ------------------------------------------------------------------------------------------------
# Official formats
# ------------------------------------------------------------------------------------------------


def official_dict(rng, topo, *, num_components=400, shapedirs_dtype=np.float64):
    """The keys and shapes of flame2023_Open.pkl / generic_model.pkl with random values;
    `topo` is the `flame_topology` fixture (real template, triangles, identity 1..60)."""
    shapedirs = rng.normal(0.0, 1e-3, (V, 3, num_components))
    shapedirs[..., :60] = topo["shapedirs_id60"]
    weights = rng.uniform(0.0, 1.0, (V, 5))
    weights /= weights.sum(1, keepdims=True)
    regressor = scipy.sparse.random(5, V, density=0.01, random_state=1, format="csc")
    regressor = scipy.sparse.csc_matrix(regressor.multiply(1.0 / regressor.sum(1)))
    return {
        "v_template": topo["v_template"].astype(np.float64),
        "f": topo["faces"].astype(np.uint32),
        "shapedirs": shapedirs.astype(shapedirs_dtype),
        "posedirs": rng.normal(0.0, 1e-3, (V, 3, 36)),
        "weights": weights,
        "J_regressor": regressor,
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.int64),
        "J": rng.normal(size=(5, 3)),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }


def check_matches_official(model, data, *, num_shape=300, num_expression=100):
    np.testing.assert_allclose(model.v_template, data["v_template"], rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(model.faces, data["f"].astype(np.int32))
    assert model.faces.dtype == np.int32
    np.testing.assert_allclose(model.shapedirs, data["shapedirs"][..., :num_shape],
                               rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(model.exprdirs, data["shapedirs"][..., 300:300 + num_expression],
                               rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(model.j_regressor, data["J_regressor"].toarray(), rtol=1e-6,
                               atol=1e-9)
    np.testing.assert_allclose(model.lbs_weights, data["weights"], rtol=1e-6, atol=1e-9)
    assert model.parents == FLAME_PARENTS
    # smplx posedirs layout: pose_feature (36,) @ posedirs (36, V*3) == sum_p posedirs[v,c,p] f_p.
    pose_feature = np.random.default_rng(7).normal(size=36)
    expected = np.einsum("vcp,p->vc", data["posedirs"], pose_feature)
    got = (pose_feature.astype(np.float32) @ np.asarray(model.posedirs)).reshape(V, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
    assert model.posedirs.shape == (36, V * 3)


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def official(tmp_path_factory, flame_topology):
    """(data dict, path) of a 2023-style plain-dict pkl written by Python 3 with protocol 5."""
    data = official_dict(np.random.default_rng(0), flame_topology)
    path = tmp_path_factory.mktemp("official") / "flame2023_Open.pkl"
    with open(path, "wb") as handle:
        pickle.dump(data, handle, protocol=5)
    return data, path


@pytest.fixture(scope="module")
def small_official(flame_topology):
    """Official layout with the fewest components the loader accepts (fast bad-input files)."""
    return official_dict(np.random.default_rng(1), flame_topology, num_components=301,
                         shapedirs_dtype=np.float32)


@pytest.fixture(scope="module")
def model_2023(official):
    return fio.load(official[1])


@pytest.fixture(scope="module")
def embedding(landmark_embedding):
    return dict(landmark_embedding)


# ------------------------------------------------------------------------------------------------
# Model files
# ------------------------------------------------------------------------------------------------

def test_2023_plain_dict_pkl(official, model_2023, embedding):
    check_matches_official(model_2023, official[0])
    assert model_2023.num_shape == 300 and model_2023.num_expression == 100
    for key, value in embedding.items():  # official files carry no landmarks: the shipped ones
        np.testing.assert_array_equal(getattr(model_2023, key), value)
    assert model_2023.masks is None and model_2023.albedo_mean is None
    assert model_2023.mediapipe_lmk_faces is None


def test_python2_protocol2_dict_pkl(tmp_path, small_official):
    path = tmp_path / "py2.pkl"
    write_py2_pickle(small_official, path)
    assert b"numpy.core.multiarray" in path.read_bytes()  # really the old names
    with pytest.raises(UnicodeDecodeError):  # really needs latin1 like the official files
        pickle.loads(path.read_bytes())
    model = fio.load(path)
    check_matches_official(model, small_official, num_expression=1)


def test_chumpy_2020_pkl_without_chumpy(tmp_path, fake_chumpy, small_official):
    ch, _, dot = fake_chumpy
    data = dict(small_official)
    for key in ("v_template", "shapedirs", "posedirs", "weights"):
        data[key] = ch(small_official[key])
    data["J"] = dot(a=ch(np.ones((5, 3))), b=ch(np.ones((3, 3))))  # unused operator node
    path = tmp_path / "generic_model.pkl"
    write_py2_pickle(data, path)
    assert b"chumpy.ch\nCh" in path.read_bytes()
    sys.modules.pop("chumpy.ch")
    sys.modules.pop("chumpy")
    sys.modules.pop("chumpy.ch_ops")
    sys.modules.pop("chumpy.reordering")
    model = fio.load(path)
    check_matches_official(model, small_official, num_expression=1)


def test_official_npz_layout(tmp_path, small_official):
    path = tmp_path / "official.npz"
    arrays = {k: v for k, v in small_official.items() if k not in ("bs_style", "bs_type")}
    arrays["J_regressor"] = arrays["J_regressor"].toarray()
    np.savez(path, **arrays)
    small = dict(small_official)
    check_matches_official(fio.load(path), small, num_expression=1)


def test_truncation_of_components(official):
    data, path = official
    model = fio.load(path, num_shape=10, num_expression=5)
    assert model.shapedirs.shape == (V, 3, 10) and model.exprdirs.shape == (V, 3, 5)
    check_matches_official(model, data, num_shape=10, num_expression=5)
    zero = fio.load(path, num_shape=0, num_expression=0)
    assert zero.num_shape == 0 and zero.num_expression == 0
    with pytest.raises(fio.FlameFileError, match=r"flame2023_Open\.pkl.*num_shape=301.*300"):
        fio.load(path, num_shape=301)
    with pytest.raises(fio.FlameFileError, match=r"num_expression=101.*100"):
        fio.load(path, num_expression=101)
    with pytest.raises(TypeError, match="num_shape"):
        fio.load(path, num_shape=2.5)


# ------------------------------------------------------------------------------------------------
# Landmarks, masks, MediaPipe
# ------------------------------------------------------------------------------------------------

def write_official_landmarks(tmp_path, embedding):
    static = {"lmk_face_idx": embedding["static_lmk_faces"].astype(np.uint32),
              "lmk_b_coords": embedding["static_lmk_bary"].astype(np.float64)}
    static_path = tmp_path / "flame_static_embedding.pkl"
    write_py2_pickle(static, static_path)
    dynamic = {"lmk_face_idx": [row.astype(np.uint32) for row in embedding["dynamic_lmk_faces"]],
               "lmk_b_coords": [row.astype(np.float64) for row in embedding["dynamic_lmk_bary"]]}
    dynamic_path = tmp_path / "flame_dynamic_embedding.npy"
    np.save(dynamic_path, np.array(dynamic, dtype=object), allow_pickle=True)
    return static_path, dynamic_path


def test_official_landmark_formats_roundtrip(tmp_path, embedding):
    static_path, dynamic_path = write_official_landmarks(tmp_path, embedding)
    static = fio.load_static_landmarks(static_path)
    dynamic = fio.load_dynamic_landmarks(dynamic_path)
    for key, value in {**static, **dynamic}.items():
        np.testing.assert_allclose(value, embedding[key], rtol=0, atol=1e-7)
        assert value.dtype == (np.int32 if "faces" in key else np.float32)


def test_landmark_overrides_replace_defaults(tmp_path, official, embedding):
    changed = dict(embedding)
    changed["static_lmk_faces"] = embedding["static_lmk_faces"][::-1].copy()
    changed["static_lmk_bary"] = embedding["static_lmk_bary"][::-1].copy()
    changed["dynamic_lmk_faces"] = embedding["dynamic_lmk_faces"][::-1].copy()
    changed["dynamic_lmk_bary"] = embedding["dynamic_lmk_bary"][::-1].copy()
    static_path, dynamic_path = write_official_landmarks(tmp_path, changed)
    model = fio.load(official[1], static_landmarks=static_path, dynamic_landmarks=dynamic_path)
    for key in ("static_lmk_faces", "static_lmk_bary", "dynamic_lmk_faces", "dynamic_lmk_bary"):
        np.testing.assert_allclose(getattr(model, key), changed[key], atol=1e-7)
        assert not np.array_equal(getattr(model, key), embedding[key])


def test_shared_auxiliary_files(shared_dir, official, embedding):
    model = fio.load(official[1], masks=shared_dir / "FLAME_masks.pkl",
                     static_landmarks=shared_dir / "flame_static_embedding.pkl",
                     dynamic_landmarks=shared_dir / "flame_dynamic_embedding.npy",
                     mediapipe=shared_dir / "mediapipe_landmark_embedding.npz")
    sizes = {name: int(idx.shape[0]) for name, idx in model.masks.items()}
    assert sizes == {"face": 1787, "eye_region": 751, "left_eye_region": 287,
                     "right_eye_region": 287, "nose": 379, "lips": 254, "forehead": 133,
                     "scalp": 489, "neck": 253, "boundary": 114, "left_ear": 588,
                     "right_ear": 588, "left_eyeball": 546, "right_eyeball": 546}
    np.testing.assert_array_equal(np.sort(model.masks["left_eyeball"]), np.arange(3931, 4477))
    np.testing.assert_array_equal(np.sort(model.masks["right_eyeball"]), np.arange(4477, 5023))
    assert all(idx.dtype == np.int32 for idx in model.masks.values())
    assert int(model.vertex_mask("face").sum()) == 1787
    for key, value in embedding.items():  # README: the RingNet files equal the shipped embedding
        np.testing.assert_allclose(getattr(model, key), value, atol=1e-7)
    derived = np.load(shared_dir / "flame2023_open_derived_id60_basis.npz")
    np.testing.assert_array_equal(model.mediapipe_lmk_faces, derived["lmk_face_idx"])
    np.testing.assert_allclose(model.mediapipe_lmk_bary, derived["lmk_b_coords"], atol=1e-7)
    np.testing.assert_array_equal(model.mediapipe_lmk_ids, derived["landmark_indices"])
    assert model.mediapipe_lmk_ids.min() >= 0 and model.mediapipe_lmk_ids.max() <= 466
    triangles = fio.load_npy(shared_dir / "FLAME_masks_triangles.npy")  # pickled 0-d dict
    assert triangles["face_clean"].shape == (1024,) and triangles["cleaner_lips"].shape == (128,)
    # README: on the real template the static and MediaPipe points land on the face, |y| < 5.5 cm.
    verts, faces = derived["v_template"], derived["faces"]
    for tri, bary in ((model.static_lmk_faces, model.static_lmk_bary),
                      (model.mediapipe_lmk_faces, model.mediapipe_lmk_bary)):
        points = np.einsum("lk,lkc->lc", np.asarray(bary), verts[faces[np.asarray(tri)]])
        assert np.abs(points[:, 1]).max() < 0.055


def test_masks_out_of_range_and_bad_mediapipe(tmp_path, official):
    path = tmp_path / "FLAME_masks.pkl"
    write_py2_pickle({"face": np.array([0, 5, V], np.int64)}, path)
    with pytest.raises(fio.FlameFileError, match=r"FLAME_masks\.pkl.*'face'.*outside \[0, 5023\)"):
        fio.load(official[1], masks=path)
    mp_path = tmp_path / "mediapipe_landmark_embedding.npz"
    np.savez(mp_path, lmk_face_idx=np.zeros(4, np.uint32), lmk_b_coords=np.ones((3, 3)),
             landmark_indices=np.arange(4))
    with pytest.raises(fio.FlameFileError, match=r"mediapipe_landmark_embedding\.npz.*"
                                                 r"'lmk_b_coords'.*\(3, 3\).*\(4, 3\)"):
        fio.load(official[1], mediapipe=mp_path)


# ------------------------------------------------------------------------------------------------
# Texture
# ------------------------------------------------------------------------------------------------

def linear_rgb(uv, k):
    """RGB in [0, 1], linear in (u, v); k = 0 is the mean, k >= 1 the basis images."""
    u, v = uv[..., 0], uv[..., 1]
    if k == 0:
        return np.stack([0.2 + 0.5 * u, 0.1 + 0.7 * v, 0.3 + 0.2 * u + 0.3 * v], -1)
    return np.stack([k * (u - v), 0.1 * k * v, -0.2 * u + 0.05 * k], -1)


def texel_centres(size):
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    return np.stack([(cols + 0.5) / size, 1.0 - (rows + 0.5) / size], -1)  # row 0 is v = 1


@pytest.fixture(scope="module")
def uv_layout(flame_topology):
    """Per-vertex UV in the texture interior; ft = faces plus 100 seam duplicates."""
    faces = flame_topology["faces"]
    vertex_uv = np.random.default_rng(3).uniform(0.1, 0.9, (V, 2))
    ft = faces.astype(np.int64).copy()
    seam_vertices = faces[:100, 0]
    vt = np.concatenate([vertex_uv, vertex_uv[seam_vertices]])
    ft[:100, 0] = V + np.arange(100)
    return vertex_uv, vt, ft


def test_flame_texture_to_vertex_albedo(tmp_path, official, uv_layout):
    vertex_uv, vt, ft = uv_layout
    grid = texel_centres(64)
    rgb = np.stack([linear_rgb(grid, k) for k in range(5)], -1) * 255.0  # (64, 64, 3, 5)
    path = tmp_path / "FLAME_texture.npz"
    np.savez(path, mean=rgb[:, :, ::-1, 0], tex_dir=rgb[:, :, ::-1, 1:], vt=vt, ft=ft)  # BGR
    model = fio.load(official[1], texture=path, num_texture=3)
    assert model.albedo_mean.shape == (V, 3) and model.albedo_basis.shape == (V, 3, 3)
    np.testing.assert_allclose(model.albedo_mean, linear_rgb(vertex_uv, 0), atol=2e-5)
    for k in range(3):
        np.testing.assert_allclose(model.albedo_basis[..., k], linear_rgb(vertex_uv, k + 1),
                                   atol=2e-5)
    with pytest.raises(fio.FlameFileError, match=r"FLAME_texture\.npz.*num_texture=9.*4"):
        fio.load(official[1], texture=path, num_texture=9)


def test_bfm_albedo_needs_and_uses_uv_template(tmp_path, official, uv_layout):
    vertex_uv, _, _ = uv_layout
    faces = official[0]["f"].astype(np.int64)
    grid = texel_centres(32)
    mean = linear_rgb(grid, 0)[:, :, ::-1].reshape(-1)
    pcs = np.stack([linear_rgb(grid, k)[:, :, ::-1].reshape(-1) for k in (1, 2)], -1)
    path = tmp_path / "FLAME_albedo_from_BFM.npz"
    np.savez(path, MU=mean, PC=pcs)
    with pytest.raises(fio.FlameFileError, match=r"FLAME_albedo_from_BFM\.npz.*texture_uv"):
        fio.load(official[1], texture=path, num_texture=2)
    obj = tmp_path / "head_template.obj"
    lines = [f"v 0 0 {i}" for i in range(V)] + [f"vt {u:.9f} {v:.9f}" for u, v in vertex_uv]
    lines += [f"f {a + 1}/{a + 1} {b + 1}/{b + 1} {c + 1}/{c + 1}" for a, b, c in faces]
    obj.write_text("\n".join(lines) + "\n")
    model = fio.load(official[1], texture=path, texture_uv=obj, num_texture=2)
    np.testing.assert_allclose(model.albedo_mean, linear_rgb(vertex_uv, 0), atol=2e-6)
    np.testing.assert_allclose(model.albedo_basis[..., 1], linear_rgb(vertex_uv, 2), atol=2e-6)


def test_sample_uv_bilinear_orientation():
    image = np.zeros((4, 8, 1))
    image[0, 7] = 1.0  # top-right texel: u near 1, v near 1
    at = fio.sample_uv_bilinear(image, np.array([[7.5 / 8, 1 - 0.5 / 4], [0.5 / 8, 0.5 / 4]]))
    np.testing.assert_allclose(at[:, 0], [1.0, 0.0])


# ------------------------------------------------------------------------------------------------
# Our npz
# ------------------------------------------------------------------------------------------------

def test_save_load_roundtrip_all_fields(tmp_path, official, uv_layout, shared_dir):
    _, vt, ft = uv_layout
    grid = texel_centres(16)
    rgb = np.stack([linear_rgb(grid, k) for k in range(3)], -1) * 255.0
    texture = tmp_path / "FLAME_texture.npz"
    np.savez(texture, mean=rgb[..., 0], tex_dir=rgb[..., 1:], vt=vt, ft=ft)
    model = fio.load(official[1], num_shape=20, num_expression=10, texture=texture, num_texture=2,
                     masks=shared_dir / "FLAME_masks.pkl",
                     mediapipe=shared_dir / "mediapipe_landmark_embedding.npz")
    path = tmp_path / "model.npz"
    fio.save(model, path)
    again = fio.load(path)
    before, after = to_numpy(model), to_numpy(again)
    assert sorted(before) == sorted(after)
    for key in before:
        assert before[key].dtype == after[key].dtype, key
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    assert again.parents == model.parents and sorted(again.masks) == sorted(model.masks)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_save_load_keeps_none_fields(tmp_path, model_2023):
    path = tmp_path / "plain.npz"
    fio.save(model_2023, path)
    again = fio.load(path, num_expression=50)
    for field in ("masks", "albedo_mean", "albedo_basis", "mediapipe_lmk_faces",
                  "mediapipe_lmk_bary", "mediapipe_lmk_ids"):
        assert getattr(again, field) is None, field
    np.testing.assert_array_equal(again.exprdirs, np.asarray(model_2023.exprdirs)[..., :50])
    np.testing.assert_array_equal(again.posedirs, model_2023.posedirs)


def test_save_is_atomic(tmp_path, model_2023, monkeypatch):
    path = tmp_path / "model.npz"
    path.write_bytes(b"previous content")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash mid-write")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        fio.save(model_2023, path)
    assert path.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def dump(tmp_path, name, data):
    path = tmp_path / name
    with open(path, "wb") as handle:
        pickle.dump(data, handle, protocol=2)
    return path


def test_bad_model_files(tmp_path, small_official):
    missing = dict(small_official)
    del missing["posedirs"]
    cases = [(dump(tmp_path, "missing.pkl", missing), r"missing\.pkl.*missing key.*'posedirs'")]
    wrong = dict(small_official, posedirs=np.zeros((V, 3, 35)))
    cases.append((dump(tmp_path, "wrong.pkl", wrong),
                  r"wrong\.pkl.*'posedirs'.*\(5023, 3, 35\).*\(5023, 3, 36\)"))
    nan = dict(small_official, v_template=small_official["v_template"].copy())
    nan["v_template"][10, 1] = np.nan
    cases.append((dump(tmp_path, "nan.pkl", nan), r"nan\.pkl.*'v_template'.*NaN"))
    inf = dict(small_official, weights=small_official["weights"].copy())
    inf["weights"][3, 2] = np.inf
    cases.append((dump(tmp_path, "inf.pkl", inf), r"inf\.pkl.*'weights'.*NaN/inf"))
    few = dict(small_official, shapedirs=small_official["shapedirs"][..., :300])
    cases.append((dump(tmp_path, "few.pkl", few), r"few\.pkl.*'shapedirs'.*300 components"))
    tree = dict(small_official, kintree_table=np.array([[-1, 0, 1, 2, 1], [0, 1, 2, 3, 4]]))
    cases.append((dump(tmp_path, "tree.pkl", tree), r"tree\.pkl.*parents \(-1, 0, 1, 2, 1\)"))
    bad_faces = dict(small_official, f=small_official["f"].astype(np.int64))
    bad_faces["f"][5, 2] = V
    cases.append((dump(tmp_path, "faces.pkl", bad_faces), r"faces\.pkl.*'f'.*outside"))
    cases.append((dump(tmp_path, "list.pkl", [1, 2]), r"list\.pkl.*dict"))
    good = dump(tmp_path, "good.pkl", small_official).read_bytes()
    check_matches_official(fio.load(tmp_path / "good.pkl"), small_official, num_expression=1)
    (tmp_path / "half.pkl").write_bytes(good[: len(good) // 2])
    cases.append((tmp_path / "half.pkl", r"half\.pkl.*truncated or corrupt"))
    _, png = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "image.pkl").write_bytes(png.tobytes())
    cases.append((tmp_path / "image.pkl", r"image\.pkl.*PNG"))
    (tmp_path / "empty.pkl").write_bytes(b"")
    cases.append((tmp_path / "empty.pkl", r"empty\.pkl.*empty"))
    np.save(tmp_path / "array.npy", np.zeros(3))
    cases.append((tmp_path / "array.npy", r"array\.npy.*not a FLAME model"))
    for path, pattern in cases:
        with pytest.raises(fio.FlameFileError, match=pattern):
            fio.load(path)


def test_bad_npz_files(tmp_path, model_2023):
    path = tmp_path / "ours.npz"
    fio.save(model_2023, path)
    arrays = dict(np.load(path))
    del arrays["lbs_weights"]
    np.savez(tmp_path / "nokey.npz", **arrays)
    with pytest.raises(fio.FlameFileError, match=r"nokey\.npz.*missing key.*'lbs_weights'"):
        fio.load(tmp_path / "nokey.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(fio.FlameFileError, match=r"other\.npz.*missing key.*'v_template'"):
        fio.load(tmp_path / "other.npz")
    arrays = dict(np.load(path), parents=np.array([-1, 0, 0, 1, 1]))
    np.savez(tmp_path / "parents.npz", **arrays)
    with pytest.raises(fio.FlameFileError, match=r"parents\.npz.*parents"):
        fio.load(tmp_path / "parents.npz")
    blob = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(fio.FlameFileError, match=r"cut\.npz.*truncated or corrupt"):
        fio.load(tmp_path / "cut.npz")
    with pytest.raises(fio.FlameFileError, match=r"mediapipe\.pkl.*not an \.npz"):
        fio.load_mediapipe(dump(tmp_path, "mediapipe.pkl", {}))


def test_missing_path_and_wrong_aux_files(tmp_path, official):
    missing = tmp_path / "nowhere" / "generic_model.pkl"
    with pytest.raises(fio.FlameFileError, match=r"nowhere.*generic_model\.pkl.*no such file"):
        fio.load(missing)
    with pytest.raises(FileNotFoundError):
        fio.load(missing)
    with pytest.raises(fio.FlameFileError, match=r"static\.pkl.*missing key.*'lmk_face_idx'"):
        fio.load(official[1], static_landmarks=dump(tmp_path, "static.pkl", {"x": 1}))
    np.save(tmp_path / "dyn.npy", np.array({"lmk_face_idx": [np.zeros(17)] * 78,
                                            "lmk_b_coords": [np.zeros((17, 3))] * 78}),
            allow_pickle=True)
    with pytest.raises(fio.FlameFileError, match=r"dyn\.npy.*'lmk_face_idx'.*\(78, 17\)"):
        fio.load(official[1], dynamic_landmarks=tmp_path / "dyn.npy")
    np.savez(tmp_path / "texture.npz", a=np.zeros(2))
    with pytest.raises(fio.FlameFileError, match=r"texture\.npz.*not a FLAME texture space"):
        fio.load(official[1], texture=tmp_path / "texture.npz")


# ------------------------------------------------------------------------------------------------
# Hostile pickles
# ------------------------------------------------------------------------------------------------

class Evil:
    def __init__(self, how, sentinel):
        self.how, self.sentinel = how, str(sentinel)

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"touch {self.sentinel}",)
        return exec, (f"open({self.sentinel!r}, 'w').close()",)


@pytest.mark.parametrize("how", ["system", "exec"])
def test_malicious_pickles_do_not_run(tmp_path, how):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Evil(how, control)))  # the payload is live under plain pickle
    assert control.exists()

    sentinel = tmp_path / "SENTINEL"
    name = "system" if how == "system" else "exec"
    model_path = dump(tmp_path, "generic_model.pkl", {"v_template": Evil(how, sentinel)})
    with pytest.raises(fio.FlameFileError, match=rf"generic_model\.pkl.*forbidden global.*{name}"):
        fio.load(model_path)
    masks_path = dump(tmp_path, "FLAME_masks.pkl", {"face": Evil(how, sentinel)})
    with pytest.raises(fio.FlameFileError, match=rf"FLAME_masks\.pkl.*forbidden.*{name}"):
        fio.load_masks(masks_path, V)
    npy_path = tmp_path / "flame_dynamic_embedding.npy"
    np.save(npy_path, np.array({"lmk_face_idx": Evil(how, sentinel)}, dtype=object),
            allow_pickle=True)
    with pytest.raises(fio.FlameFileError, match=rf"flame_dynamic_embedding\.npy.*forbidden"):
        fio.load_dynamic_landmarks(npy_path)
    assert not sentinel.exists()
