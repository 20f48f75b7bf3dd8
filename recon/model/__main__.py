"""Check an ArcFace import: `python -m recon.model PATH [--batch 4] [--seed 0]`.

Imports PATH (ONNX or arcface_torch .pth), prints the architecture found, and for ONNX files
compares the embeddings of random images in [-1, 1] with onnxruntime's (needs the dev extra):
max |ours - onnxruntime| / max |onnxruntime| must be <= 1e-4 (exit status 1 otherwise).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recon.model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import jax

    from recon.model import import_arcface

    start = time.perf_counter()
    module, variables = import_arcface(args.path)
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables["params"]))
    print(f"{args.path}: IResNet stages={tuple(module.stages)} width={module.width} "
          f"embedding={module.embedding_size}, {count / 1e6:.2f} M parameters, imported in "
          f"{time.perf_counter() - start:.1f} s")
    images = np.random.default_rng(args.seed).uniform(-1, 1, (args.batch, 112, 112, 3))
    images = images.astype(np.float32)
    apply = jax.jit(module.apply)
    start = time.perf_counter()
    ours = np.asarray(apply(variables, images))
    print(f"jax: compile + run {time.perf_counter() - start:.1f} s", end="")
    start = time.perf_counter()
    ours = np.asarray(apply(variables, images))
    print(f", run {time.perf_counter() - start:.3f} s for batch {args.batch}")
    if args.path.endswith(".pth"):
        return 0
    try:
        import onnxruntime
    except ImportError:
        print("onnxruntime not installed: no comparison")
        return 0
    session = onnxruntime.InferenceSession(args.path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    reference = session.run(None, {name: images.transpose(0, 3, 1, 2).copy()})[0]
    error = float(np.abs(ours - reference).max() / np.abs(reference).max())
    cosine = np.sum(ours * reference, 1) / (np.linalg.norm(ours, axis=1)
                                            * np.linalg.norm(reference, axis=1))
    print(f"vs onnxruntime: relative error {error:.2e} (limit 1e-4), min cosine "
          f"{cosine.min():.8f}")
    return 0 if error <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
