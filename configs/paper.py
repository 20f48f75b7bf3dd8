"""The paper's training settings (PAPER.md); you bring the licensed files.

    python train.py --config configs/paper.py --workdir runs/paper \
        --config.model.arcface_path=/path/to/glintr100.onnx \
        --config.flame.path=/path/to/FLAME2020/generic_model.pkl \
        --config.flame.masks=/path/to/FLAME_masks.pkl \
        --config.flame.texture=/path/to/FLAME_texture.npz \
        --config.data.root=/path/to/MICA/datasets \
        --config.data.names='("FaceWarehouse", "LYHM", "Stirling", "FLORENCE")'

IResNet-100 with imported ArcFace weights (`model.arcface_path`: insightface glintr100.onnx or
an arcface_torch backbone.pth); only the last stage (3 blocks), the output BN/FC and the MICA
head train. The same ArcFace network, frozen, is the recognition network of the identity loss
(`recognition_arcface_path` follows `model.arcface_path` unless set). AdamW lr 1e-5, weight
decay 2e-4, constant; batch 8 subjects x 2 images; 160k steps; 224 x 224 crops (the backbone
sees them resized to 112); the paper's loss weights (w3d 0.4, w2d 0.6, vertex 0.5, 3D-ID 0.5)
and DECA's 2D weights; MICA-format data (`data.root`, `data.names`), FLAME 2020 with its masks and texture
(`flame.path`, `flame.masks`, `flame.texture`).

Without those files it stops at once with one error naming every missing entry.

    python train.py --config configs/paper.py:smoke --workdir runs/paper_smoke

runs the same path on stand-ins written into <workdir>/fakes/ (`config.fakes = "paper"`,
`recon.training.fakes`: FLAME 2020-format pickle, masks, texture, ArcFace-layout ONNX IResNet
1-1-1-1, MICA-format tree of 4 rendered actors x 3 images with landmark files), 3 steps of
2 actors x 2 images: about 3 min on a busy 2-core CPU from nothing (fakes 30 s, tiny CoMA 20 s,
compiling the step 55 s and the evaluation 30 s), 1.8 min once the fakes and CoMA exist.
The 3D-ID loss's CoMA encoder: trained on 20,000 heads of the run's FLAME model (30k steps, see
`config.coma` below) and cached per FLAME digest, or `coma_checkpoint_dir` (e.g. a CoMA trained
on registrations with configs/coma.py), checked against the run's mesh topology.
Runtime: not measured here (no GPU was lent); the per-step cost is in benchmarks/train_step.py.
"""

import pathlib

from recon.options import load_config_file


def _default_config(arg: str):
    return load_config_file(pathlib.Path(__file__).with_name("default.py"), arg)


def get_config(arg: str = ""):
    if arg not in ("", "smoke"):
        raise ValueError(f"configs/paper.py: unknown argument {arg!r}; use '' or 'smoke'")
    config = _default_config(arg)
    config.flame.path = ""                      # required: FLAME 2020 generic_model.pkl
    config.flame.masks = ""                     # required: FLAME_masks.pkl
    config.flame.texture = ""                   # FLAME_texture.npz (the 2D losses' albedo)

    config.model.backbone = "iresnet"
    config.model.stages = (3, 13, 30, 3)        # IResNet-100
    config.model.width = 64
    config.model.embedding_size = 512
    config.model.head_hidden_size = 300
    config.model.head_num_hidden = 3
    config.model.trainable = "last_stage"
    config.model.batch_norm = "running"         # ArcFace's statistics, frozen (as MICA)
    config.model.arcface_path = ""              # required: ArcFace weights
    config.model.dlib_path = ""
    config.model.dlib_output = "descriptor"
    config.model.trunk_cache = False            # real data: every image is read as it comes
    config.model.feature_norm = "l2"            # MICA's L2-normalised ArcFace embedding
    config.model.dtype = "auto"                 # bfloat16 on GPU/TPU, float32 on CPU
    config.model.param_dtype = "float32"
    config.model.precision = "default"
    # The identity term's network: the same ArcFace, frozen.
    config.recognition.network = "arcface"
    config.recognition.path = config.model.get_ref("arcface_path")

    config.optim.learning_rate = 1e-5
    config.optim.weight_decay = 2e-4
    config.optim.warmup_steps = 0
    config.optim.final_lr_fraction = 1.0        # constant learning rate
    config.optim.grad_clip_norm = 0.0

    config.loss.identity = 0.2                  # DECA's weight

    config.data.source = "mica"
    config.data.root = ""                       # required: MICA-format datasets root
    config.data.names = ()                      # required: dataset names under data.root
    # MICA's arcface_input crops: insightface's 5-point norm_crop at 224 (the backbone sees them
    # at 112, the 2D losses at 224).
    config.data.crop.anchor = "arcface_five_points"
    config.data.crop.size = 224
    config.data.image_size = 224
    config.data.pool = False
    config.data.batch_subjects = 8
    config.data.images_per_subject = 2
    config.data.num_workers = 4
    config.data.mica_landmarks = "detected"

    # The 3D-ID loss's CoMA encoder, sized for the paper: trained on heads of the run's own FLAME
    # (FLAME 2020: its identity space at the prior's spread, expressions and jaw as MICA's
    # neutral-ish meshes), 20,000 training and 1,000 held-out heads, 30k steps of 32 (CoMA's
    # ~300 epochs of 20k meshes at batch 16 is ~375k; the encoder only has to rank identities),
    # cached per (config, mesh hierarchy, FLAME digest). Registered scans instead:
    # --config.coma.data.source=folder --config.coma.data.folder=DIR; or a trained one:
    # --config.coma_checkpoint_dir=runs/coma/checkpoints (checked against the FLAME topology).
    config.coma.data.shape_std = 1.0
    config.coma.data.num_train = 20_000
    config.coma.data.num_test = 1_000
    config.coma.steps = 30_000
    config.coma.batch_size = 32
    config.coma.checkpoint_every = 5_000
    config.coma.log_every = 100

    config.steps = 160_000
    config.log_every = 100
    config.checkpoint_every = 5_000
    config.eval_every = 10_000
    config.image_every = 5_000
    config.eval_batch_size = 16

    # "paper": train.py writes stand-ins for the licensed files (recon.training.fakes: a FLAME
    # 2020-format pickle with masks and texture, an ArcFace-layout ONNX IResNet, a MICA-format
    # tree of rendered heads with landmark files) into <workdir>/fakes/ and points the config
    # at them; '' = the files named above.
    config.fakes = ""

    if arg == "smoke":  # the paper's whole path on the fakes, at test size
        config.fakes = "paper"
        config.model.head_hidden_size = 32
        config.model.head_num_hidden = 1
        config.data.batch_subjects = 2      # 4 images of 224 x 224 per step
        config.data.num_workers = 0
        config.data.num_eval_subjects = 2
        config.eval_batch_size = 4
        # A tiny CoMA for the 3D-ID loss, trained on heads of the run's (fake) FLAME model.
        config.coma.data.num_train = 16
        config.coma.data.num_test = 8
        config.coma.eval_batch_size = 4
        config.coma.steps = 2
        config.coma.batch_size = 4
        config.coma.checkpoint_every = 2
        config.coma.log_every = 1
        config.steps = 3
        config.log_every = 1
        config.checkpoint_every = 3
        config.eval_every = 0
        config.image_every = 0
    return config
