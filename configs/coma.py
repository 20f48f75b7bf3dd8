"""CoMA autoencoder on FLAME meshes: the frozen encoder behind the 3D-ID loss.

    python train.py --config configs/coma.py                  # default run, CPU, workdir runs/coma
    python train.py --config configs/coma.py:smoke            # a few steps, for tests/CI
    python train.py --config configs/coma.py --config.steps=3000 --workdir runs/coma_3000

Default: 2048 synthetic FLAME heads (identity N(0,1) on all 300 components, expression N(0,1)
on all 100, jaw opening U(0, 0.25) rad, canonical pose), 256 held-out heads, batch 16,
Adam 1e-3 with cosine decay, L1 on normalised coordinates. Running the same command again on
the same workdir resumes from the latest checkpoint (a different config fails, naming keys).
Measured before the move to recon.training.coma (2-core CPU shared with other jobs; same model,
data and optimizer): default 600 steps in 434 s, held-out mean per-vertex error 3.50 mm (PCA
with 8 components on the same training meshes: 2.97 mm; mean mesh: 5.41 mm);
`--config.steps=3000`: 1632 s, 3.36 mm; `--config.learning_rate=3e-3 --config.steps=2000`:
1205 s, 3.28 mm. See README.md.
To train on registrations instead:
    --config.data.source=folder --config.data.folder=/path/to/meshes
(FLAME-topology meshes in any format trimesh reads, all with 5023 vertices;
--config.data.scale=0.001 for millimetre files).
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "coma"
    config.seed = 0  # initialisation and data order
    config.cache_dir = ""  # mesh hierarchy cache; '' -> $FACERECON_CACHE_DIR or ~/.cache/...
    config.factors = (4, 4, 4, 4)  # down-sampling factor per level

    config.model = ml_collections.ConfigDict()
    config.model.num_vertices = 5023
    config.model.filters = (16, 16, 16, 32)
    config.model.order = 6  # Chebyshev K
    config.model.latent_size = 8
    config.model.method = "segment_sum"  # or "bcoo"

    config.data = ml_collections.ConfigDict()
    config.data.source = "synthetic"  # or "folder"
    config.data.folder = ""
    config.data.scale = 1.0  # multiplies folder meshes (0.001 for millimetre files)
    config.data.test_fraction = 0.1  # folder data: the last files in sorted order
    config.data.num_train = 2048
    config.data.num_test = 256
    config.data.seed = 0  # synthetic meshes: training seed; held-out meshes use seed + 1
    config.data.shape_std = 1.0
    config.data.expression_std = 1.0
    config.data.jaw_open_max = 0.25  # rad

    config.steps = 600
    config.batch_size = 16  # global batch, split over the devices
    config.learning_rate = 1e-3
    config.final_lr_fraction = 0.05
    config.log_every = 10
    config.checkpoint_every = 200
    config.max_to_keep = 3
    config.eval_batch_size = 32

    if arg == "smoke":
        # A smaller network so that tests and CI compile and run it in seconds.
        config.model.filters = (8, 8, 8, 8)
        config.model.order = 3
        config.data.num_train = 16
        config.data.num_test = 8
        config.steps = 3
        config.batch_size = 4
        config.log_every = 1
        config.checkpoint_every = 2
        config.eval_batch_size = 4
    elif arg:
        raise ValueError(f"configs/coma.py: unknown argument {arg!r}; use '' or 'smoke'")
    return config
