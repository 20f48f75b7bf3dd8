"""Benchmark: forward + backward of an L1 photometric loss through `recon.render.render`.

    PYTHONPATH=. python benchmarks/render.py                      # batch 8, 224 x 224, FLAME
    PYTHONPATH=. python benchmarks/render.py --preview docs/render_preview.png --no-naive

Beside the windowed rasterizer it measures, in the same run, a naive dense JAX rasterizer
(every pixel against every triangle, scanned over triangle chunks) that feeds the same
differentiable interpolation and shading, and prints the ratio. Output (benchmarks/timing.py):
an environment JSON line, one JSON line per variant, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import timing

import flame_jax
from recon.render import camera as camera_lib
from recon import render
from recon.render import rasterizer, shading

LIGHTS = {
    # (9, 3) SH coefficients: DECA band order [1, x, y, z, xy, xz, yz, x^2-y^2, 3z^2-1].
    "frontal": {0: (2.4, 2.4, 2.4), 3: (0.6, 0.6, 0.6)},
    "from the side": {0: (2.6, 2.6, 2.6), 1: (1.0, 1.0, 1.0), 3: (0.4, 0.4, 0.4)},
    "warm, from above": {0: (3.0, 2.5, 2.0), 2: (1.1, 0.9, 0.7), 3: (0.3, 0.25, 0.2),
                         8: (0.25, 0.2, 0.15)},
}


def sh_light(spec: dict) -> np.ndarray:
    light = np.zeros((9, 3), np.float32)
    for band, rgb in spec.items():
        light[band] = rgb
    return light


def make_scene(batch: int, seed: int = 0):
    """FLAME (the built-in synthetic model) at a few head poses, textures and lights."""
    model = flame_jax.synthetic()
    rng = np.random.default_rng(seed)
    params = flame_jax.FlameParams.zeros(batch, model)
    params = params.replace(
        global_pose=jnp.asarray(rng.uniform(-0.35, 0.35, (batch, 3)) * [0.5, 1.0, 0.2],
                                jnp.float32),
        expression=jnp.asarray(rng.normal(0, 0.5, params.expression.shape), jnp.float32),
        jaw_pose=jnp.asarray(np.c_[rng.uniform(0, 0.15, batch), np.zeros((batch, 2))],
                             jnp.float32))
    vertices = flame_jax.forward(model, params).vertices
    texture = jnp.asarray(rng.normal(0, 1.0, (batch, model.num_texture)), jnp.float32)
    albedo = shading.albedo_from_texture(model.albedo_mean, model.albedo_basis, texture)
    names = list(LIGHTS)
    light = jnp.asarray(np.stack([sh_light(LIGHTS[names[i % 3]]) for i in range(batch)]))
    cam = jnp.asarray(np.c_[rng.uniform(7.5, 9.0, batch), rng.normal(0, 0.01, (batch, 2))],
                      jnp.float32)
    return model, vertices, albedo, light, cam


def dense_visibility(screen, faces, height, width, chunk=128):
    """Naive z-buffer: all pixels x all triangles (lax.scan over triangle chunks, lax.map over
    images). Same inside test and depth rule as the library. Returns (B, H, W) face index."""
    table, valid = rasterizer.face_table(jax.lax.stop_gradient(screen), faces)
    num_faces = table.shape[1]
    pad = (-num_faces) % chunk
    table = jnp.pad(table, ((0, 0), (0, pad), (0, 0)))
    valid = jnp.pad(valid, ((0, 0), (0, pad)))
    xs = (jnp.arange(width, dtype=jnp.float32) + 0.5)[None, :].repeat(height, 0).reshape(-1, 1)
    ys = (jnp.arange(height, dtype=jnp.float32) + 0.5)[:, None].repeat(width, 1).reshape(-1, 1)

    def one_image(args):
        tab, ok = args
        tab = tab.reshape(-1, chunk, tab.shape[-1])
        ok = ok.reshape(-1, chunk)
        ids = jnp.arange(tab.shape[0] * chunk, dtype=jnp.int32).reshape(-1, chunk)

        def body(carry, inputs):
            best_z, best_face = carry
            rows, mask, face_ids = inputs
            dx, dy = xs - rows[None, :, 0], ys - rows[None, :, 1]
            l1 = rows[None, :, 2] * dx + rows[None, :, 3] * dy
            l2 = rows[None, :, 4] * dx + rows[None, :, 5] * dy
            z = rows[None, :, 9] + l1 * rows[None, :, 10] + l2 * rows[None, :, 11]
            inside = mask[None] & (l1 >= 0) & (l2 >= 0) & (l1 + l2 <= 1)
            z = jnp.where(inside, z, -jnp.inf)
            k = jnp.argmax(z, axis=1)
            z_k = jnp.take_along_axis(z, k[:, None], 1)[:, 0]
            better = z_k > best_z
            return (jnp.where(better, z_k, best_z), jnp.where(better, face_ids[k], best_face)), None

        init = (jnp.full((height * width,), -jnp.inf), jnp.full((height * width,), -1, jnp.int32))
        (_, face), _ = jax.lax.scan(body, init, (tab, ok, ids))
        return face.reshape(height, width)

    return jax.lax.map(one_image, (table, valid))


def make_losses(settings, sigma=0.5):
    def fast(vertices, faces, cam, light, albedo, target):
        out = render.render(vertices, faces, cam, light, albedo, settings=settings, sigma=sigma)
        return jnp.mean(jnp.abs(render.composite(out, 0.0) - target)), out.overflow

    def naive(vertices, faces, cam, light, albedo, target):
        size = (settings.height, settings.width)
        screen = camera_lib.project_to_pixels(vertices, cam, size)
        normals = shading.vertex_normals(vertices, faces)
        attributes = jnp.concatenate([albedo, normals, screen[..., 2:3]], -1)
        face_index = dense_visibility(screen, faces, *size)
        table, _ = rasterizer.face_table(screen, faces)
        _, values, alpha, _ = rasterizer.interpolate(face_index, table, faces, attributes,
                                                     sigma, settings.soft_radius,
                                                     settings.band_capacity)
        image = values[..., :3] * shading.sh_shading(values[..., 3:6], light)
        return jnp.mean(jnp.abs(alpha[..., None] * image - target)), face_index

    return fast, naive


def write_preview(path: str, size: int = 224):
    """Two heads (texture samples) x [albedo, three lights]; PNG via OpenCV."""
    import cv2

    model, vertices, _, _, _ = make_scene(2, seed=3)
    rng = np.random.default_rng(7)
    texture = jnp.asarray(rng.normal(0, 0.7, (2, model.num_texture)), jnp.float32)
    albedo = shading.albedo_from_texture(model.albedo_mean, model.albedo_basis, texture)
    settings = rasterizer.RasterSettings(height=size, width=size)
    cam = jnp.asarray([[7.5, 0.0, 0.01], [7.5, 0.0, 0.01]], jnp.float32)
    panels = []
    flat = np.zeros((9, 3), np.float32)
    flat[0] = 1.0 / shading.SH_CONSTANTS[0]  # shading == 1: the albedo itself
    for light in [flat] + [sh_light(spec) for spec in LIGHTS.values()]:
        out = render.render(vertices, model.faces, cam, jnp.asarray(np.stack([light] * 2)),
                            albedo, settings=settings, sigma=0.3)
        panels.append(np.asarray(render.composite(out, 1.0)))
    grid = np.concatenate([np.concatenate([p[b] for p in panels], 1) for b in range(2)], 0)
    image = (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--naive-repeats", type=int, default=1)
    parser.add_argument("--no-naive", action="store_true", help="skip the dense baseline")
    parser.add_argument("--preview", help="also write the preview PNG to this path")
    args = parser.parse_args()

    if args.preview:
        write_preview(args.preview)
        print(json.dumps({"preview": args.preview}))

    model, vertices, albedo, light, cam = make_scene(args.batch)
    settings = rasterizer.RasterSettings(height=args.size, width=args.size)
    fast, naive = make_losses(settings)
    # Target: the same heads rendered with other lights and slightly moved cameras.
    target_out = render.render(vertices, model.faces, cam * jnp.asarray([1.02, 1.0, 1.0]) + 0.002,
                               jnp.roll(light, 1, axis=0), albedo, settings=settings)
    target = render.composite(target_out, 0.0)
    inputs = (vertices, model.faces, cam, light, albedo, target)
    grad_args = (0, 2, 3, 4)  # vertices, camera, light, albedo

    timing.print_environment(batch=args.batch, size=args.size, faces=int(model.faces.shape[0]))
    ms = lambda seconds: f"{seconds * 1e3:,.0f}"  # noqa: E731
    report = timing.Report(
        f"render: L1 photometric loss, batch {args.batch}, {args.size} x {args.size}",
        [("variant", "variant", "{}"), ("median_s", "median ms", ms), ("min_s", "best ms", ms),
         ("overflow", "band overflow", "{}"), ("face_index_agreement", "face agreement", "{:.4f}"),
         ("ratio_naive_over_windowed", "naive / windowed", "{:.1f}x")])
    step = jax.jit(jax.value_and_grad(fast, argnums=grad_args, has_aux=True))
    (_, overflow), _ = step(*inputs)
    windowed = timing.measure(step, *inputs, repeats=args.repeats)
    report.row(variant="windowed forward+backward", **windowed.as_dict(),
               overflow=int(np.sum(np.asarray(overflow))))
    forward = jax.jit(fast)
    report.row(variant="windowed forward only",
               **timing.measure(forward, *inputs, repeats=args.repeats).as_dict())

    if not args.no_naive:
        naive_step = jax.jit(jax.value_and_grad(naive, argnums=grad_args, has_aux=True))
        (_, dense_faces), _ = naive_step(*inputs)
        faces_fast = render.render(vertices, model.faces, cam, light, albedo,
                                   settings=settings).face_index
        covered = (np.asarray(dense_faces) >= 0) | (np.asarray(faces_fast) >= 0)
        agreement = float(np.mean(np.asarray(dense_faces)[covered] ==
                                  np.asarray(faces_fast)[covered]))
        dense = timing.measure(naive_step, *inputs, repeats=args.naive_repeats, warmup=0)
        report.row(variant="naive dense forward+backward", **dense.as_dict(),
                   face_index_agreement=agreement,
                   ratio_naive_over_windowed=dense.median_s / windowed.median_s)
    report.print_markdown()


if __name__ == "__main__":
    main()
