"""Sample FLAME heads and write them as meshes plus a preview PNG.

    python -m flame_jax --out outputs/flame_samples [--model generic_model.pkl] [--num 8]

Without --model the built-in synthetic FLAME is used (no download). Each head is written as
`head_<i>.obj`; `preview.png` shows them (neutral, expressions, turned heads).
"""

import argparse
import pathlib

import cv2
import jax.numpy as jnp
import numpy as np

import flame_jax
from flame_jax.fileio import atomic_write, write_mesh
from flame_jax.preview import grid, shade_mesh


def sample_params(model, num_heads, seed):
    """Head 0 neutral; then random identity + expression, every third one turned."""
    rng = np.random.default_rng(seed)
    params = flame_jax.FlameParams.zeros(num_heads, model)
    shape = rng.normal(0, 1.0, params.shape.shape)
    expression = rng.normal(0, 1.0, params.expression.shape)
    jaw = np.zeros((num_heads, 3))
    jaw[:, 0] = rng.uniform(0, 0.25, num_heads)
    yaw = np.zeros((num_heads, 3))
    yaw[2::3, 1] = rng.choice([-0.6, 0.6], len(yaw[2::3]))
    for array in (shape, expression, jaw, yaw):
        array[0] = 0.0
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return params.replace(shape=f32(shape), expression=f32(expression), jaw_pose=f32(jaw),
                          global_pose=f32(yaw))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("outputs/flame_samples"))
    parser.add_argument("--model", type=pathlib.Path, default=None,
                        help="FLAME file (generic_model.pkl, flame2023_Open.pkl or our .npz)")
    parser.add_argument("--num", type=int, default=6, help="number of heads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256, help="preview tile size in pixels")
    args = parser.parse_args(argv)

    model = flame_jax.synthetic() if args.model is None else flame_jax.load(args.model)
    params = sample_params(model, args.num, args.seed)
    out = flame_jax.forward(model, params)
    args.out.mkdir(parents=True, exist_ok=True)
    faces = np.asarray(model.faces)
    colors = None if model.albedo_mean is None else np.asarray(model.albedo_mean)
    tiles = []
    for i, vertices in enumerate(np.asarray(out.vertices)):
        write_mesh(args.out / f"head_{i}.obj", vertices, faces)
        tiles.append(shade_mesh(vertices, faces, size=args.size, colors=colors))
    preview = grid(tiles, columns=min(args.num, 3))
    ok, png = cv2.imencode(".png", cv2.cvtColor(preview, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("OpenCV could not encode the preview PNG")
    atomic_write(args.out / "preview.png", png.tobytes())
    print(f"wrote {args.num} meshes and preview.png to {args.out}")


if __name__ == "__main__":
    main()
