"""Spectral graph convolutions on meshes: the CoMA autoencoder behind the 3D-ID loss.

    hierarchy = spectral_gcn.flame_hierarchy()            # cached .npz, built once with scipy
    model = spectral_gcn.AutoEncoder(spectral_gcn.CoMAConfig())
    frozen = spectral_gcn.load_encoder("runs/coma/checkpoints")
    latent = spectral_gcn.encode(frozen, vertices)        # (B, 5023, 3) m -> (B, 8), jit-safe

A library: hierarchy, layers, models, and saving/loading the encoder's own variables. The
training loop lives in `recon.training.coma` (`python train.py --config configs/coma.py`).
"""

from spectral_gcn.checkpoint import (CheckpointError, FrozenEncoder, checkpoint_items, encode,
                                     load_checkpoint, load_encoder, save_checkpoint)
from spectral_gcn.layers import ChebConv, chebyshev_basis, downsample, sparse_matmul, upsample
from spectral_gcn.mesh import (MeshHierarchy, SparseMatrix, build_hierarchy, flame_hierarchy,
                               flame_topology, load_hierarchy, save_hierarchy)
from spectral_gcn.models import AutoEncoder, CoMAConfig, Decoder, Encoder

__all__ = ["CheckpointError", "FrozenEncoder", "checkpoint_items", "encode", "load_checkpoint",
           "load_encoder", "save_checkpoint", "ChebConv", "chebyshev_basis", "downsample",
           "sparse_matmul", "upsample", "MeshHierarchy", "SparseMatrix", "build_hierarchy",
           "flame_hierarchy", "flame_topology", "load_hierarchy", "save_hierarchy",
           "AutoEncoder", "CoMAConfig", "Decoder", "Encoder"]
