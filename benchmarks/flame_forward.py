"""FLAME forward throughput: flame_jax.forward vs a straightforward JAX port of smplx's `lbs`.

    python benchmarks/flame_forward.py [--batches 1 8 64 256] [--repeats 200] [--seconds 2]

Both run jitted in float32 on the same model (the built-in synthetic FLAME, 300 shape + 100
expression components) in the same process, timed interleaved (round-robin, so that the load
of a shared machine hits both alike); the table gives meshes/s and latency from the best-of
and the median call, and the ratio of the medians. When torch and smplx are installed,
smplx's own `lbs` on CPU tensors is measured too. The reference port keeps smplx's structure
and storage: blend shapes as a (V, 3, 400) buffer, `einsum('bl,mkl->bmk')`, 4x4 homogeneous
transforms, and per-vertex batched matmul skinning; its arrays are prepared once, outside the
timed call, as smplx keeps them as module buffers.
Output (benchmarks/timing.py): an environment JSON line, a JSON line per batch size, then the
markdown table.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import timing

import flame_jax
from flame_jax.rotation import rodrigues


def smplx_buffers(model) -> dict:
    """The arrays smplx's FLAME layer holds, in its layout (numpy -> device once)."""
    to_device = lambda x: jnp.asarray(np.asarray(x, np.float32))  # noqa: E731
    return dict(v_template=to_device(model.v_template),
                shapedirs=to_device(np.concatenate([model.shapedirs, model.exprdirs], axis=2)),
                posedirs=to_device(model.posedirs), j_regressor=to_device(model.j_regressor),
                lbs_weights=to_device(model.lbs_weights))


def smplx_port(buffers, params, parents=flame_jax.model.FLAME_PARENTS):
    """smplx.lbs.lbs written straight in JAX (vertices only, as the reference)."""
    betas = jnp.concatenate([params.shape, params.expression], axis=1)
    shapedirs = buffers["shapedirs"]
    batch_size = betas.shape[0]
    v_shaped = buffers["v_template"] + jnp.einsum("bl,mkl->bmk", betas, shapedirs)
    joints = jnp.einsum("bik,ji->bjk", v_shaped, buffers["j_regressor"])
    rot_mats = rodrigues(params.full_pose().reshape(-1, 3)).reshape(batch_size, -1, 3, 3)
    pose_feature = (rot_mats[:, 1:] - jnp.eye(3)).reshape(batch_size, -1)
    v_posed = v_shaped + jnp.matmul(pose_feature, buffers["posedirs"]).reshape(batch_size, -1, 3)
    rel_joints = joints.at[:, 1:].add(-joints[:, jnp.array(parents[1:])])
    transforms_mat = jnp.concatenate([
        jnp.concatenate([rot_mats, rel_joints[..., None]], axis=-1),
        jnp.broadcast_to(jnp.array([0.0, 0.0, 0.0, 1.0]), (batch_size, 5, 1, 4))], axis=-2)
    chain = [transforms_mat[:, 0]]
    for i in range(1, len(parents)):
        chain.append(jnp.matmul(chain[parents[i]], transforms_mat[:, i]))
    transforms = jnp.stack(chain, axis=1)
    joints_homogen = jnp.pad(joints[..., None], ((0, 0), (0, 0), (0, 1), (0, 0)))
    rel_transforms = transforms - jnp.pad(jnp.matmul(transforms, joints_homogen),
                                          ((0, 0), (0, 0), (0, 0), (3, 0)))
    lbs_weights = buffers["lbs_weights"]
    weights = jnp.broadcast_to(lbs_weights[None], (batch_size,) + lbs_weights.shape)
    per_vertex = jnp.matmul(weights, rel_transforms.reshape(batch_size, 5, 16)).reshape(
        batch_size, -1, 4, 4)
    homogen = jnp.concatenate([v_posed, jnp.ones_like(v_posed[..., :1])], axis=2)
    v_homo = jnp.matmul(per_vertex, homogen[..., None])
    return v_homo[:, :, :3, 0] + params.translation[:, None]


def torch_smplx_runner(model, batch_size):
    try:
        import torch
        from smplx.lbs import lbs
    except ImportError:
        return None
    to_torch = lambda x: torch.from_numpy(np.asarray(x, np.float32))  # noqa: E731
    shapedirs = to_torch(np.concatenate([model.shapedirs, model.exprdirs], axis=2))
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
    parser.add_argument("--repeats", type=int, default=200,
                        help="timed calls per variant (capped by --seconds)")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="approximate timing budget per variant and batch size")
    args = parser.parse_args()

    model = flame_jax.synthetic()
    buffers = smplx_buffers(model)
    ours = jax.jit(lambda m, p: flame_jax.forward(m, p).vertices)
    reference = jax.jit(smplx_port)
    timing.print_environment(dtype="float32", num_shape=model.num_shape,
                             num_expression=model.num_expression)
    per_second = lambda value: f"{value:,.0f}"  # noqa: E731
    ms = lambda seconds: f"{seconds * 1e3:.3f}"  # noqa: E731
    report = timing.Report(
        f"FLAME forward ({model.num_shape} shape + {model.num_expression} expression, float32, "
        f"jit)",
        [("batch", "batch", "{}"), ("ours_meshes_per_s_best", "ours meshes/s (best)", per_second),
         ("ours_min_s", "ours ms (best)", ms), ("ours_median_s", "ours ms (median)", ms),
         ("smplx_port_meshes_per_s_best", "smplx-port meshes/s (best)", per_second),
         ("smplx_port_median_s", "smplx-port ms (median)", ms),
         ("ratio_median", "ratio (medians)", "{:.2f}x"),
         ("torch_smplx_meshes_per_s", "torch smplx meshes/s", per_second)])
    rng = np.random.default_rng(0)
    for batch_size in args.batches:
        params = flame_jax.FlameParams.zeros(batch_size, model)
        params = params.replace(
            shape=jnp.asarray(rng.normal(size=params.shape.shape), jnp.float32),
            expression=jnp.asarray(rng.normal(size=params.expression.shape), jnp.float32),
            global_pose=jnp.asarray(rng.normal(0, 0.2, (batch_size, 3)), jnp.float32),
            jaw_pose=jnp.asarray(rng.normal(0, 0.1, (batch_size, 3)), jnp.float32))
        np.testing.assert_allclose(ours(model, params), reference(buffers, params), atol=1e-5)
        probe = timing.measure(ours, model, params, repeats=3)  # size the repeats to --seconds
        repeats = int(np.clip(args.seconds / (2 * probe.median_s), 5, args.repeats))
        results = timing.measure_interleaved(
            {"ours": (ours, (model, params)), "smplx_port": (reference, (buffers, params))},
            repeats=repeats, warmup=0)
        row = dict(batch=batch_size, repeats=repeats)
        for name, result in results.items():
            row.update({f"{name}_median_s": result.median_s, f"{name}_min_s": result.min_s,
                        f"{name}_meshes_per_s_best": batch_size / result.min_s,
                        f"{name}_meshes_per_s_median": batch_size / result.median_s})
        row["ratio_median"] = results["smplx_port"].median_s / results["ours"].median_s
        row["ratio_best"] = results["smplx_port"].min_s / results["ours"].min_s
        torch_run = torch_smplx_runner(model, batch_size)
        if torch_run is not None:
            torch_result = timing.measure(torch_run, repeats=5, min_seconds=args.seconds)
            row["torch_smplx_meshes_per_s"] = batch_size / torch_result.median_s
        report.row(**row)
    report.print_markdown()


if __name__ == "__main__":
    main()
