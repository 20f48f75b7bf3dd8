"""FLAME forward throughput: flame_jax.forward vs a straightforward JAX port of smplx's `lbs`.

    python benchmarks/flame_forward.py [--batches 1 8 64 256] [--seconds 2]

Both run jitted in float32 on the same model (the built-in synthetic FLAME, 300 shape + 100
expression components) in the same process; the table prints meshes/s, latency and the ratio.
When torch and smplx are installed, smplx's own `lbs` on CPU tensors is measured too.
The reference port keeps smplx's structure: concatenated betas and blend-shape basis,
`einsum('bl,mkl->bmk')`, 4x4 homogeneous transforms, and per-vertex batched matmul skinning.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import flame_jax
from flame_jax.rotation import rodrigues


def smplx_port(model, params):
    """smplx.lbs.lbs written straight in JAX (vertices only, as the reference)."""
    betas = jnp.concatenate([params.shape, params.expression], axis=1)
    shapedirs = jnp.concatenate([model.shapedirs, model.exprdirs], axis=2)
    batch_size = betas.shape[0]
    v_shaped = model.v_template + jnp.einsum("bl,mkl->bmk", betas, shapedirs)
    joints = jnp.einsum("bik,ji->bjk", v_shaped, model.j_regressor)
    rot_mats = rodrigues(params.full_pose().reshape(-1, 3)).reshape(batch_size, -1, 3, 3)
    pose_feature = (rot_mats[:, 1:] - jnp.eye(3)).reshape(batch_size, -1)
    v_posed = v_shaped + jnp.matmul(pose_feature, model.posedirs).reshape(batch_size, -1, 3)
    rel_joints = joints.at[:, 1:].add(-joints[:, jnp.array(model.parents[1:])])
    transforms_mat = jnp.concatenate([
        jnp.concatenate([rot_mats, rel_joints[..., None]], axis=-1),
        jnp.broadcast_to(jnp.array([0.0, 0.0, 0.0, 1.0]), (batch_size, 5, 1, 4))], axis=-2)
    chain = [transforms_mat[:, 0]]
    for i in range(1, len(model.parents)):
        chain.append(jnp.matmul(chain[model.parents[i]], transforms_mat[:, i]))
    transforms = jnp.stack(chain, axis=1)
    joints_homogen = jnp.pad(joints[..., None], ((0, 0), (0, 0), (0, 1), (0, 0)))
    rel_transforms = transforms - jnp.pad(jnp.matmul(transforms, joints_homogen),
                                          ((0, 0), (0, 0), (0, 0), (3, 0)))
    weights = jnp.broadcast_to(model.lbs_weights[None], (batch_size,) + model.lbs_weights.shape)
    per_vertex = jnp.matmul(weights, rel_transforms.reshape(batch_size, 5, 16)).reshape(
        batch_size, -1, 4, 4)
    homogen = jnp.concatenate([v_posed, jnp.ones_like(v_posed[..., :1])], axis=2)
    v_homo = jnp.matmul(per_vertex, homogen[..., None])
    return v_homo[:, :, :3, 0] + params.translation[:, None]


def measure(function, args, seconds):
    """Median seconds per call over repeated timed blocks (after a warm-up call)."""
    jax.block_until_ready(function(*args))
    timings = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(timings) < 5:
        start = time.perf_counter()
        jax.block_until_ready(function(*args))
        timings.append(time.perf_counter() - start)
    return float(np.median(timings))


def torch_smplx_runner(model, batch_size):
    try:
        import torch
        from smplx.lbs import lbs
    except ImportError:
        return None
    to_torch = lambda x: torch.from_numpy(np.asarray(x, np.float32))  # noqa: E731
    shapedirs = to_torch(jnp.concatenate([model.shapedirs, model.exprdirs], axis=2))
    tensors = dict(v_template=to_torch(model.v_template), shapedirs=shapedirs,
                   posedirs=to_torch(model.posedirs), J_regressor=to_torch(model.j_regressor),
                   parents=torch.tensor([-1, 0, 1, 1, 1]), lbs_weights=to_torch(model.lbs_weights))
    betas = torch.zeros(batch_size, shapedirs.shape[-1])
    pose = torch.zeros(batch_size, 15)

    def run():
        with torch.no_grad():
            return lbs(betas, pose, **tensors)[0]
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per measurement")
    args = parser.parse_args()

    model = flame_jax.synthetic()
    ours = jax.jit(lambda m, p: flame_jax.forward(m, p).vertices)
    reference = jax.jit(smplx_port)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; float32; "
          f"{model.num_shape} shape + {model.num_expression} expression components")
    header = ("batch", "ours meshes/s", "ours ms", "smplx-port meshes/s", "ratio",
              "torch smplx meshes/s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rng = np.random.default_rng(0)
    for batch_size in args.batches:
        params = flame_jax.FlameParams.zeros(batch_size, model)
        params = params.replace(
            shape=jnp.asarray(rng.normal(size=params.shape.shape), jnp.float32),
            expression=jnp.asarray(rng.normal(size=params.expression.shape), jnp.float32),
            global_pose=jnp.asarray(rng.normal(0, 0.2, (batch_size, 3)), jnp.float32),
            jaw_pose=jnp.asarray(rng.normal(0, 0.1, (batch_size, 3)), jnp.float32))
        np.testing.assert_allclose(ours(model, params), reference(model, params), atol=1e-5)
        ours_s = measure(ours, (model, params), args.seconds)
        reference_s = measure(reference, (model, params), args.seconds)
        torch_run = torch_smplx_runner(model, batch_size)
        torch_cell = "not installed"
        if torch_run is not None:
            torch_cell = f"{batch_size / measure(torch_run, (), args.seconds):,.0f}"
        print(f"| {batch_size} | {batch_size / ours_s:,.0f} | {ours_s * 1e3:.3f} | "
              f"{batch_size / reference_s:,.0f} | {reference_s / ours_s:.2f}x | {torch_cell} |")


if __name__ == "__main__":
    main()
