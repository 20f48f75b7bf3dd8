"""Benchmark the CoMA encoder: sparse Laplacian formulations against a dense-Laplacian model.

    PYTHONPATH=. python benchmarks/spectral_encoder.py [--batch 64] [--repeats 5]

Times forward and forward+backward (grad of the summed code with respect to the parameters and
the input vertices) at one batch size, on the FLAME hierarchy (5023 -> 1256 -> 314 -> 79 -> 20),
for the two sparse formulations of L~ x (segment_sum, BCOO) and for the same model with dense
(N, N) Laplacians and dense (N', N) down-sampling matrices. All variants run in the same process,
interleaved, with the same parameters; their outputs are checked to agree first. Reports the
median and best wall time of each and ratios (of medians) against the dense reference, plus
analytic FLOP counts. Output (benchmarks/timing.py): an environment JSON line, a JSON line per
variant, then a markdown table.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import timing

import spectral_gcn


def dense_encoder(variables, dense_ops, vertices, config):
    """The Encoder's computation with dense matrices; same variables as spectral_gcn.Encoder.

    dense_ops: {"laplacians": [(N_l, N_l)], "down": [(N_{l+1}, N_l)]} float32 arrays.
    """
    params, stats = variables["params"], variables["stats"]
    x = (vertices - stats["mean"]) / stats["std"]
    for level in range(len(config.filters)):
        lap = dense_ops["laplacians"][level]
        conv = params[f"conv_{level}"]
        terms = [x]
        if config.order > 1:
            terms.append(jnp.einsum("nm,bmf->bnf", lap, x))
        for _ in range(2, config.order):
            terms.append(2.0 * jnp.einsum("nm,bmf->bnf", lap, terms[-1]) - terms[-2])
        x = jnp.einsum("kbnf,kfo->bno", jnp.stack(terms), conv["kernel"]) + conv["bias"]
        x = jax.nn.relu(x)
        x = jnp.einsum("mn,bnf->bmf", dense_ops["down"][level], x)
    flat = x.reshape(x.shape[0], -1)
    return flat @ params["dense"]["kernel"] + params["dense"]["bias"]


def flop_counts(hierarchy, config):
    """(sparse, dense) multiply-add FLOPs (x2) per mesh of one encoder forward pass."""
    sparse = dense = 0
    channels = 3
    for level, features in enumerate(config.filters):
        n = hierarchy.sizes[level]
        nnz = int(hierarchy.laplacians[level].rows.shape[0])
        applications = config.order - 1
        weights = 2 * n * config.order * channels * features
        sparse += 2 * applications * nnz * channels + weights
        dense += 2 * applications * n * n * channels + weights
        dense += 2 * hierarchy.sizes[level + 1] * n * features  # dense D
        channels = features
    fc = 2 * hierarchy.sizes[-1] * channels * config.latent_size
    return sparse + fc, dense + fc


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    hierarchy = spectral_gcn.flame_hierarchy()
    vertices = jnp.asarray(hierarchy.vertices[0])[None] + 0.003 * jax.random.normal(
        jax.random.key(0), (args.batch, hierarchy.sizes[0], 3))
    base = spectral_gcn.CoMAConfig()
    variables = spectral_gcn.Encoder(base).init(jax.random.key(1), vertices[:1], hierarchy)
    variables = {"params": variables["params"],
                 "stats": {"mean": jnp.asarray(hierarchy.vertices[0]),
                           "std": jnp.full((hierarchy.sizes[0], 3), 0.005)}}
    dense_ops = {
        "laplacians": [hierarchy.laplacians[l].to_dense() for l in range(len(base.filters))],
        "down": [jnp.asarray(hierarchy.down_matrix(l).toarray(), jnp.float32)
                 for l in range(len(base.filters))]}

    variants = {}
    for method in ("segment_sum", "bcoo"):
        encoder = spectral_gcn.Encoder(spectral_gcn.CoMAConfig(method=method))
        apply = lambda v, ops, x, encoder=encoder: encoder.apply(v, x, ops)  # noqa: E731
        variants[method] = (apply, hierarchy)
    variants["dense"] = (lambda v, ops, x: dense_encoder(v, ops, x, base), dense_ops)

    reference = None
    functions = {}
    for name, (apply, ops) in variants.items():
        forward = jax.jit(apply)
        backward = jax.jit(jax.grad(lambda v, ops, x, apply=apply: apply(v, ops, x).sum(),
                                    argnums=(0, 2)))
        out = np.asarray(forward(variables, ops, vertices))
        if reference is None:
            reference = out
        np.testing.assert_allclose(out, reference, rtol=2e-3, atol=2e-3, err_msg=name)
        jax.block_until_ready(backward(variables, ops, vertices))  # compile before timing
        functions[name] = (forward, backward, ops)

    # Interleave the variants so load changes hit them alike (compiled above: no warm-up).
    results = timing.measure_interleaved(
        {f"{name} {kind}": (function, (variables, ops, vertices))
         for name, (forward, backward, ops) in functions.items()
         for kind, function in (("forward", forward), ("forward+backward", backward))},
        repeats=args.repeats, warmup=0)

    sparse_flops, dense_flops = flop_counts(hierarchy, base)
    timing.print_environment(batch=args.batch, repeats=args.repeats,
                             sparse_forward_flop_per_mesh=sparse_flops,
                             dense_forward_flop_per_mesh=dense_flops)
    ms = lambda seconds: f"{seconds * 1e3:.0f}"  # noqa: E731
    report = timing.Report(
        f"CoMA encoder, batch {args.batch} (forward FLOP per mesh: sparse "
        f"{sparse_flops / 1e6:.1f} M, dense {dense_flops / 1e6:.0f} M)",
        [("variant", "variant", "{}"), ("forward_median_s", "forward ms", ms),
         ("backward_median_s", "fwd+bwd ms", ms),
         ("forward_speedup", "forward speed-up vs dense", "{:.1f}x"),
         ("backward_speedup", "fwd+bwd speed-up vs dense", "{:.1f}x")])
    dense_forward = results["dense forward"].median_s
    dense_backward = results["dense forward+backward"].median_s
    for name in functions:
        forward, backward = results[f"{name} forward"], results[f"{name} forward+backward"]
        report.row(variant=name, forward_median_s=forward.median_s, forward_min_s=forward.min_s,
                   backward_median_s=backward.median_s, backward_min_s=backward.min_s,
                   forward_speedup=dense_forward / forward.median_s,
                   backward_speedup=dense_backward / backward.median_s)
    report.print_markdown()


if __name__ == "__main__":
    main()
