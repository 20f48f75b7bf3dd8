"""flame_jax.fileio: atomic writes, mesh files through trimesh, errors naming the path."""

import numpy as np
import pytest

from flame_jax import FlameFileError
from flame_jax.errors import FlameFileNotFoundError
from flame_jax.fileio import atomic_write, read_mesh, read_npz, write_mesh


def test_atomic_write_bytes_str_and_callable(tmp_path):
    path = tmp_path / "out.bin"
    assert atomic_write(path, b"\x00\x01") == path
    assert path.read_bytes() == b"\x00\x01"
    atomic_write(path, "héllo")
    assert path.read_text(encoding="utf-8") == "héllo"
    atomic_write(path, lambda handle: np.save(handle, np.arange(4)))
    np.testing.assert_array_equal(np.load(path), np.arange(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]  # no temporary left


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_write_failure_midway_keeps_old_file(tmp_path, error):
    path = tmp_path / "model.npz"
    path.write_bytes(b"previous content")

    def write_then_fail(handle):
        handle.write(b"half of the new cont")
        raise error("simulated crash mid-write")

    with pytest.raises(error, match="mid-write"):
        atomic_write(path, write_then_fail)
    assert path.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]


def test_atomic_write_bad_arguments(tmp_path):
    with pytest.raises(FlameFileNotFoundError, match=r"missing.*does not exist"):
        atomic_write(tmp_path / "missing" / "x.bin", b"")
    with pytest.raises(TypeError, match="bytes, str or a callable"):
        atomic_write(tmp_path / "x.bin", 3)


def tetrahedron():
    vertices = np.array([[0, 0, 0], [0.1, 0, 0], [0, 0.2, 0], [0, 0, 0.3]], np.float32)
    faces = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], np.int32)
    return vertices, faces


@pytest.mark.parametrize("suffix", [".obj", ".ply", ".glb", ".off", ".stl"])
def test_mesh_round_trip(tmp_path, suffix, flame_topology):
    vertices, faces = tetrahedron()
    if suffix in (".obj", ".ply"):  # the real FLAME mesh too: order and count kept exactly
        vertices, faces = flame_topology["v_template"], flame_topology["faces"]
    path = write_mesh(tmp_path / f"mesh{suffix}", vertices, faces)
    read_vertices, read_faces = read_mesh(path)
    assert read_vertices.dtype == np.float32 and read_faces.dtype == np.int32
    if suffix == ".stl":  # STL stores a triangle soup: same triangles, 3 vertices each
        np.testing.assert_allclose(read_vertices[read_faces], vertices[faces], atol=1e-7)
        return
    np.testing.assert_allclose(read_vertices, vertices, atol=1e-7)
    np.testing.assert_array_equal(read_faces, faces)


def test_read_mesh_keeps_obj_vertex_order_with_texture_coordinates(tmp_path):
    # A hand-written OBJ with vt on some faces and an unreferenced vertex: trimesh must not
    # reorder, merge or drop vertices (process=False, maintain_order=True).
    text = ("v 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nv 0 0 0\nv 5 5 5\n"
            "vt 0 0\nvt 1 0\nvt 0 1\nf 1/1 2/2 3/3\nf 1 3 4\nf 5 2 4\n")
    (tmp_path / "a.obj").write_text(text)
    vertices, faces = read_mesh(tmp_path / "a.obj")
    np.testing.assert_array_equal(vertices, [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1],
                                             [0, 0, 0], [5, 5, 5]])
    np.testing.assert_array_equal(faces, [[0, 1, 2], [0, 2, 3], [4, 1, 3]])


def test_mesh_errors_name_the_path(tmp_path):
    with pytest.raises(FlameFileNotFoundError, match=r"nowhere\.obj: no such file"):
        read_mesh(tmp_path / "nowhere.obj")
    with pytest.raises(FileNotFoundError):
        read_mesh(tmp_path / "nowhere.ply")
    (tmp_path / "broken.obj").write_text("garbage\nv 1 2\nf 1 2 3\n")
    with pytest.raises(FlameFileError, match=r"broken\.obj: cannot read mesh"):
        read_mesh(tmp_path / "broken.obj")
    (tmp_path / "cut.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex "
                                       b"10\nproperty float x\nend_header\n\x00\x00")
    with pytest.raises(FlameFileError, match=r"cut\.ply: cannot read mesh"):
        read_mesh(tmp_path / "cut.ply")
    (tmp_path / "points.obj").write_text("v 0 0 0\nv 1 0 0\n")
    with pytest.raises(FlameFileError, match=r"points\.obj.*no triangles|points\.obj.*not a"):
        read_mesh(tmp_path / "points.obj")
    (tmp_path / "nan.obj").write_text("v 0 0 nan\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    with pytest.raises(FlameFileError, match=r"nan\.obj.*NaN"):
        read_mesh(tmp_path / "nan.obj")
    with pytest.raises(FlameFileError, match="is a directory"):
        read_mesh(tmp_path)
    with pytest.raises(ValueError, match=r"unknown mesh suffix '\.xyz'"):
        write_mesh(tmp_path / "m.xyz", *tetrahedron())
    with pytest.raises(ValueError, match=r"\(V, 3\).*\(4, 2\)"):
        write_mesh(tmp_path / "m.obj", tetrahedron()[0][:, :2], tetrahedron()[1])


def test_read_npz_errors(tmp_path):
    np.savez(tmp_path / "ok.npz", a=np.arange(3))
    np.testing.assert_array_equal(read_npz(tmp_path / "ok.npz")["a"], np.arange(3))
    blob = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(FlameFileError, match=r"cut\.npz: truncated or corrupt"):
        read_npz(tmp_path / "cut.npz")
    (tmp_path / "x.npz").write_bytes(b"%PDF-1.4")
    with pytest.raises(FlameFileError, match=r"x\.npz: not an \.npz.*PDF"):
        read_npz(tmp_path / "x.npz")
    np.savez(tmp_path / "obj.npz", a=np.array([{"k": 1}], dtype=object))
    with pytest.raises(FlameFileError, match=r"obj\.npz.*truncated or corrupt|obj\.npz.*pickle"):
        read_npz(tmp_path / "obj.npz")
