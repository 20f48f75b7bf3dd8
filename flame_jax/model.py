"""The three pytree types of `flame_jax`: the model's assets, its parameters and its output.

Every array is documented with its shape. Units are metres and radians (axis-angle).
`FlameModel` is passed as an argument to jitted code, never captured as a constant.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array

NUM_JOINTS = 5  # root (global), neck, jaw, left eye, right eye
FLAME_PARENTS = (-1, 0, 1, 1, 1)
NUM_VERTICES = 5023
NUM_FACES = 9976
NUM_DYNAMIC_BINS = 79  # jaw-contour embeddings for head yaw -39..39 degrees
NUM_CONTOUR_LANDMARKS = 17
NUM_STATIC_LANDMARKS = 51


BLEND_FIELDS = ("v_template", "shapedirs", "exprdirs", "posedirs")  # stored as `blend_basis`


@struct.dataclass(kw_only=True)
class FlameModel:
    """FLAME assets in the layout of the official model (smplx naming where it has one).

    Build it with `FlameModel.create(v_template=..., shapedirs=..., exprdirs=..., posedirs=...,
    j_regressor=..., ...)` (or `flame_jax.load` / `flame_jax.synthetic`): the four blend arrays
    are stored as one basis, and the joint regressor is also applied to that basis once.

    Stored fields:
      blend_basis:   (1 + n_shape + n_expression + P * 9, V * 3): row 0 the mean head (metres),
                     then the identity, the expression and the pose-corrective blend shapes,
                     each flattened vertex-major (column 3 v + c). The posed rest mesh is then a
                     single (B, K) @ (K, V * 3) product with coefficients [1, shape, expression,
                     pose feature]: the template is folded in, and this row layout is what the
                     CPU GEMM streams fastest (see benchmarks/flame_forward.py).
      joint_basis:   (1 + n_shape + n_expression, J * 3) = j_regressor applied to the template
                     and shape/expression rows, so rest joints are a tiny product with the same
                     coefficients instead of a pass over the (B, V, 3) mesh. Derived: `create`
                     and `replace` keep it in step with blend_basis and j_regressor.
      num_shape:     static int n_shape (rows 1..n_shape of blend_basis).
      j_regressor:   (J, V) joint regressor, J = 5 (root, neck, jaw, left eye, right eye).
      lbs_weights:   (V, J) skinning weights, rows sum to one.
      faces:         (F, 3) int32 triangles (F = 9976 for FLAME).
      static_lmk_faces:  (51,) int32 triangle index of each inner-face landmark (iBUG 18..68).
      static_lmk_bary:   (51, 3) barycentric coordinates in those triangles.
      dynamic_lmk_faces: (79, 17) int32 jaw-contour triangles per head-yaw bin.
      dynamic_lmk_bary:  (79, 17, 3) barycentric coordinates per bin.
      parents:       static tuple (J,) kinematic tree, -1 for the root.

    Views of blend_basis in the official layout (properties; `replace` accepts them too):
      v_template:    (V, 3) mean head in metres (V = 5023 for FLAME).
      shapedirs:     (V, 3, n_shape) identity blend shapes.
      exprdirs:      (V, 3, n_expression) expression blend shapes.
      posedirs:      (P * 9, V * 3) pose-corrective blend shapes on the flattened (R - I) of the
                     P = J - 1 non-root joints (smplx layout: `pose_feature @ posedirs`).

    Optional fields (None when the source has none):
      mediapipe_lmk_faces: (M,) int32; mediapipe_lmk_bary: (M, 3); mediapipe_lmk_ids: (M,) int32
                     MediaPipe face-mesh vertex ids of those M points.
      albedo_mean:   (V, 3) per-vertex RGB albedo in [0, 1].
      albedo_basis:  (V, 3, n_texture) per-vertex albedo principal components.
      masks:         {name: (K,) int32 vertex indices}, e.g. face, left_eyeball, right_eyeball,
                     left_ear, right_ear, nose, lips, forehead, neck, scalp, eye_region.
    """

    blend_basis: Array = struct.field(metadata={"views": BLEND_FIELDS})
    joint_basis: Array = struct.field(metadata={"derived": True})
    num_shape: int = struct.field(pytree_node=False)
    j_regressor: Array
    lbs_weights: Array
    faces: Array
    static_lmk_faces: Array
    static_lmk_bary: Array
    dynamic_lmk_faces: Array
    dynamic_lmk_bary: Array
    mediapipe_lmk_faces: Optional[Array] = None
    mediapipe_lmk_bary: Optional[Array] = None
    mediapipe_lmk_ids: Optional[Array] = None
    albedo_mean: Optional[Array] = None
    albedo_basis: Optional[Array] = None
    masks: Optional[Mapping[str, Array]] = None
    parents: tuple = struct.field(pytree_node=False, default=FLAME_PARENTS)

    @classmethod
    def create(cls, *, v_template, shapedirs, exprdirs, posedirs, j_regressor,
               **fields) -> "FlameModel":
        """From the official layout: v_template (V, 3), shapedirs (V, 3, n_shape), exprdirs
        (V, 3, n_expression), posedirs (P * 9, V * 3), j_regressor (J, V), and the other
        fields by name."""
        basis = blend_basis(v_template, shapedirs, exprdirs, posedirs)
        num_blend = 1 + shapedirs.shape[-1] + exprdirs.shape[-1]
        return cls(blend_basis=basis, joint_basis=joint_basis(basis[:num_blend], j_regressor),
                   num_shape=int(shapedirs.shape[-1]), j_regressor=jnp.asarray(j_regressor),
                   **fields)

    def _replace(self, **updates) -> "FlameModel":
        """`dataclasses.replace`, also accepting v_template / shapedirs / exprdirs / posedirs;
        the derived joint_basis follows changes of those and of j_regressor."""
        if any(key in updates for key in BLEND_FIELDS + ("j_regressor",)):
            arrays = {key: updates.pop(key) if key in updates else getattr(self, key)
                      for key in BLEND_FIELDS + ("j_regressor",)}
            fields = {key: getattr(self, key) for key in (
                f.name for f in dataclasses.fields(self)) if key not in (
                "blend_basis", "joint_basis", "num_shape", "j_regressor")}
            return FlameModel.create(**arrays, **{**fields, **updates})
        return dataclasses.replace(self, **updates)

    @property
    def num_pose_features(self) -> int:
        return 9 * (len(self.parents) - 1)

    @property
    def v_template(self) -> Array:
        return self.blend_basis[0].reshape(-1, 3)

    @property
    def shapedirs(self) -> Array:
        return self._directions(1, 1 + self.num_shape)

    @property
    def exprdirs(self) -> Array:
        return self._directions(1 + self.num_shape, self.joint_basis.shape[0])

    @property
    def posedirs(self) -> Array:
        return self.blend_basis[self.joint_basis.shape[0]:]

    def _directions(self, start: int, stop: int) -> Array:
        rows = self.blend_basis[start:stop]  # (n, V * 3)
        return jnp.moveaxis(rows.reshape(stop - start, -1, 3), 0, -1)

    @property
    def num_vertices(self) -> int:
        return int(self.blend_basis.shape[1]) // 3

    @property
    def num_expression(self) -> int:
        return int(self.joint_basis.shape[0]) - 1 - self.num_shape

    @property
    def num_texture(self) -> int:
        return 0 if self.albedo_basis is None else int(self.albedo_basis.shape[-1])

    @property
    def num_joints(self) -> int:
        return len(self.parents)

    def vertex_mask(self, name: str) -> Array:
        """(V,) bool membership of the named region; KeyError lists the known names."""
        if not self.masks or name not in self.masks:
            known = sorted(self.masks) if self.masks else []
            raise KeyError(f"FLAME model has no vertex mask {name!r}; masks present: {known}")
        return jnp.zeros((self.num_vertices,), bool).at[self.masks[name]].set(True)


# flax's decorator installs its own `replace` (plain dataclasses.replace) on the class; ours
# must come after it so that `.replace(v_template=...)` keeps working for callers.
FlameModel.replace = FlameModel._replace


def blend_basis(v_template, shapedirs, exprdirs, posedirs) -> Array:
    """(V, 3), (V, 3, n_shape), (V, 3, n_expression), (P, V * 3) -> (1 + n_shape + n_expression
    + P, V * 3) rows [template, identity, expression, pose correctives]; ValueError on shapes."""
    num_vertices = v_template.shape[0]
    if (v_template.shape != (num_vertices, 3) or shapedirs.ndim != 3
            or shapedirs.shape[:2] != (num_vertices, 3) or exprdirs.ndim != 3
            or exprdirs.shape[:2] != (num_vertices, 3) or posedirs.ndim != 2
            or posedirs.shape[1] != num_vertices * 3):
        raise ValueError(f"blend shapes must be v_template (V, 3), shapedirs (V, 3, n), exprdirs "
                         f"(V, 3, m), posedirs (P, V * 3); got {v_template.shape}, "
                         f"{shapedirs.shape}, {exprdirs.shape}, {posedirs.shape}")
    rows = lambda directions: jnp.moveaxis(jnp.asarray(directions), -1, 0).reshape(  # noqa: E731
        directions.shape[-1], num_vertices * 3)
    dtype = jnp.result_type(v_template, shapedirs, exprdirs, posedirs)
    return jnp.concatenate([jnp.asarray(v_template).reshape(1, -1), rows(shapedirs),
                            rows(exprdirs), jnp.asarray(posedirs)], axis=0).astype(dtype)


def joint_basis(rows, j_regressor) -> Array:
    """(K, V * 3) blend rows, (J, V) regressor -> (K, J * 3): the regressor applied to each row.

    Computed in float32 at least (a bfloat16 model keeps bfloat16 storage)."""
    rows, j_regressor = jnp.asarray(rows), jnp.asarray(j_regressor)
    num_vertices = j_regressor.shape[1]
    if rows.shape[1] != num_vertices * 3:
        raise ValueError(f"j_regressor has shape {j_regressor.shape} but the blend shapes have "
                         f"{rows.shape[1] // 3} vertices")
    compute = jnp.promote_types(rows.dtype, jnp.float32)
    joints = jnp.einsum("kvc,jv->kjc", rows.reshape(rows.shape[0], num_vertices, 3).astype(compute),
                        j_regressor.astype(compute), precision=jax.lax.Precision.HIGHEST)
    return joints.reshape(rows.shape[0], -1).astype(rows.dtype)


@struct.dataclass
class FlameParams:
    """FLAME parameters for a batch of B heads (axis-angle radians, metres).

      shape:       (B, n_shape) identity coefficients (<= model.num_shape; fewer are zero-padded).
      expression:  (B, n_expression) expression coefficients (likewise).
      global_pose: (B, 3) root rotation.
      neck_pose:   (B, 3)
      jaw_pose:    (B, 3)
      eye_pose:    (B, 6) left eye then right eye.
      translation: (B, 3) added to every vertex, joint and landmark.
    """

    shape: Array
    expression: Array
    global_pose: Array
    neck_pose: Array
    jaw_pose: Array
    eye_pose: Array
    translation: Array

    @property
    def batch_size(self) -> int:
        return int(self.global_pose.shape[0])

    @classmethod
    def zeros(cls, batch_size: int, model: Optional[FlameModel] = None, *, num_shape: int = 300,
              num_expression: int = 100, dtype=jnp.float32) -> "FlameParams":
        """All-zero parameters (the template head); sizes from `model` when given."""
        if model is not None:
            num_shape, num_expression = model.num_shape, model.num_expression
        z = lambda n: jnp.zeros((batch_size, n), dtype)  # noqa: E731
        return cls(shape=z(num_shape), expression=z(num_expression), global_pose=z(3),
                   neck_pose=z(3), jaw_pose=z(3), eye_pose=z(6), translation=z(3))

    def full_pose(self) -> Array:
        """(B, J * 3) axis-angle of [global, neck, jaw, left eye, right eye]."""
        return jnp.concatenate(
            [self.global_pose, self.neck_pose, self.jaw_pose, self.eye_pose], axis=-1)


@struct.dataclass
class FlameOutput:
    """Posed FLAME surface for a batch of B heads (metres, translation included).

      vertices:  (B, V, 3)
      joints:    (B, J, 3) posed joints (root, neck, jaw, left eye, right eye).
      landmarks: (B, 68, 3) iBUG-68 order: 17 dynamic jaw-contour points then 51 static points.
      mediapipe_landmarks: (B, M, 3) when the model has a MediaPipe embedding, else None.
    """

    vertices: Array
    joints: Array
    landmarks: Array
    mediapipe_landmarks: Optional[Array] = None


def _array_fields(required: Optional[bool]) -> Tuple[str, ...]:
    names = []
    for field in dataclasses.fields(FlameModel):
        if not field.metadata.get("pytree_node", True) or field.name == "masks":
            continue  # static fields (num_shape, parents) and the masks dict
        if field.metadata.get("derived"):
            continue  # recomputed by FlameModel.create, never read from files
        is_required = (field.default is dataclasses.MISSING
                       and field.default_factory is dataclasses.MISSING)
        if required is None or required == is_required:
            names.extend(field.metadata.get("views", (field.name,)))
    return tuple(names)


def array_fields() -> Tuple[str, ...]:
    """Names of the model's arrays in files and in `FlameModel.create`, in declaration order
    (`blend_basis` as its views v_template, shapedirs, exprdirs, posedirs; not the derived
    joint_basis, masks or parents), read from the dataclass so that a new field needs no
    other list updated."""
    return _array_fields(None)


def required_array_fields() -> Tuple[str, ...]:
    """The array fields without a default (every model file must provide them)."""
    return _array_fields(True)


def to_numpy(model: FlameModel) -> dict:
    """Flat dict of numpy arrays (masks as `mask_<name>`), the layout of our `.npz` files."""
    out = {}
    for name in array_fields():
        value = getattr(model, name)
        if value is not None:
            out[name] = np.asarray(value)
    for name, idx in (model.masks or {}).items():
        out[f"mask_{name}"] = np.asarray(idx)
    out["parents"] = np.asarray(model.parents, np.int32)
    return out


def digest(model: FlameModel) -> str:
    """sha256 hex digest of every array of the model (float32/int32 bytes, names sorted) and its
    masks: equal for the same model from any file format, different when any array differs.
    Caches keyed by a model (the 3D-ID encoder, rendered training pools) use it."""
    hasher = hashlib.sha256()
    for name, value in sorted(to_numpy(model).items()):
        value = np.asarray(value)
        value = value.astype(np.int32 if np.issubdtype(value.dtype, np.integer) else np.float32)
        hasher.update(f"{name}:{value.shape};".encode())
        hasher.update(np.ascontiguousarray(value).tobytes())
    return hasher.hexdigest()


def from_numpy(arrays: Mapping, *, dtype=jnp.float32) -> FlameModel:
    """`FlameModel` from a dict of arrays: the inverse of `to_numpy`.

    Keys: every required array field, optionally the other array fields, `parents` (default
    FLAME's), and the masks either as a dict under `masks` or as `mask_<name>` entries.
    Floating arrays become `dtype`, integer arrays int32. Unknown keys raise `ValueError`
    naming them. (Values are not validated here: file readers do that, naming the file.)
    """
    names = array_fields()
    unknown = [key for key in arrays if key not in names and key not in ("masks", "parents")
               and not str(key).startswith("mask_")]
    missing = [key for key in required_array_fields() if arrays.get(key) is None]
    if unknown or missing:
        raise ValueError(f"from_numpy: unknown keys {sorted(unknown)}, missing keys {missing}")

    def convert(value):
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.integer):
            return jnp.asarray(value, jnp.int32)
        return jnp.asarray(value, dtype)

    fields = {name: convert(arrays[name]) for name in names if arrays.get(name) is not None}
    masks = dict(arrays.get("masks") or {})
    masks.update({key[len("mask_"):]: value for key, value in arrays.items()
                  if str(key).startswith("mask_")})
    parents = tuple(int(p) for p in np.asarray(arrays.get("parents", FLAME_PARENTS)).ravel())
    return FlameModel.create(masks={name: convert(idx) for name, idx in masks.items()} or None,
                             parents=parents, **fields)
