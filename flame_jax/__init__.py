"""Pure-functional FLAME head model in JAX.

    import flame_jax
    model = flame_jax.synthetic()                 # built-in default, no download
    params = flame_jax.FlameParams.zeros(batch_size=8, model=model)
    out = flame_jax.forward(model, params)        # out.vertices (8, 5023, 3) metres
"""

from flame_jax.model import FlameModel, FlameOutput, FlameParams, digest
from flame_jax.flame import forward
from flame_jax.errors import FlameFileError, FlameFileNotFoundError
from flame_jax.io import load, save
from flame_jax.procedural import synthetic

__all__ = ["FlameModel", "FlameParams", "FlameOutput", "digest", "forward", "load", "save", "synthetic",
           "FlameFileError", "FlameFileNotFoundError"]
