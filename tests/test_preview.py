"""flame_jax.preview: the quick CPU preview leaves its inputs alone and lights the right side."""

import numpy as np

from flame_jax.preview import grid, shade_mesh


def square_facing_camera(tilt_x):
    """Two triangles of a 2 x 2 cm square in the z = 0 plane, tilted about y by `tilt_x`."""
    vertices = np.array([[-0.01, -0.01, 0], [0.01, -0.01, 0], [0.01, 0.01, 0],
                         [-0.01, 0.01, 0]], np.float64)
    vertices[:, 2] = tilt_x * vertices[:, 0]
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    return vertices, faces


def test_shade_mesh_does_not_modify_its_inputs():
    vertices, faces = square_facing_camera(0.0)
    light = np.array([0.0, 0.0, 5.0])  # float64 and not unit length: the old code normalised it
    before = (vertices.copy(), faces.copy(), light.copy())
    image = shade_mesh(vertices, faces, size=16, light_direction=light)
    np.testing.assert_array_equal(light, before[2])
    np.testing.assert_array_equal(vertices, before[0])
    np.testing.assert_array_equal(faces, before[1])
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8


def test_shade_mesh_brightness_follows_the_light():
    vertices, faces = square_facing_camera(0.0)
    centre = slice(6, 10)
    facing = shade_mesh(vertices, faces, size=16, light_direction=(0, 0, 1))[centre, centre]
    grazing = shade_mesh(vertices, faces, size=16, light_direction=(1, 0, 0.2))[centre, centre]
    # Lambert: 0.15 + 0.85 cos(angle) of the default grey 0.82 -> 209 facing, ~62 grazing.
    np.testing.assert_allclose(facing, round(0.82 * 255), atol=1)
    cosine = 0.2 / np.hypot(1, 0.2)
    np.testing.assert_allclose(grazing, round(0.82 * (0.15 + 0.85 * cosine) * 255), atol=1)


def test_grid_tiles_row_major():
    tiles = [np.full((2, 3, 3), value, np.uint8) for value in (10, 20, 30)]
    canvas = grid(tiles, columns=2)
    assert canvas.shape == (4, 6, 3)
    assert canvas[0, 0, 0] == 10 and canvas[0, 3, 0] == 20 and canvas[2, 0, 0] == 30
    assert canvas[2, 3, 0] == 255  # empty cell stays white
