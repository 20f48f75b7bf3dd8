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
The 3D-ID loss's CoMA encoder: trained on synthetic heads and cached as in configs/default.py,
or `coma_checkpoint_dir` (e.g. a CoMA trained on registrations with configs/coma.py).
Runtime: not measured here (no GPU was lent); the per-step cost is in benchmarks/train_step.py.
"""

import importlib.util
import pathlib


def _default_config(arg: str):
    path = pathlib.Path(__file__).with_name("default.py")
    spec = importlib.util.spec_from_file_location("configs_default", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str = ""):
    if arg not in ("", "smoke"):
        raise ValueError(f"configs/paper.py: unknown argument {arg!r}; use '' or 'smoke'")
    config = _default_config(arg)
    config.flame.path = ""                      # required: FLAME 2020 generic_model.pkl
    config.flame.masks = ""                     # required: FLAME_masks.pkl
    config.flame.texture = ""                   # FLAME_texture.npz (the 2D losses' albedo)

    config.model.stages = (3, 13, 30, 3)        # IResNet-100
    config.model.width = 64
    config.model.embedding_size = 512
    config.model.head_hidden_size = 300
    config.model.head_num_hidden = 3
    config.model.trainable = "last_stage"
    config.model.batch_norm = "running"         # ArcFace's statistics, frozen (as MICA)
    config.model.arcface_path = ""             # required: ArcFace weights
    config.recognition_arcface_path = config.model.get_ref("arcface_path")

    config.optim.learning_rate = 1e-5
    config.optim.weight_decay = 2e-4
    config.optim.warmup_steps = 0
    config.optim.final_lr_fraction = 1.0        # constant learning rate
    config.optim.grad_clip_norm = 0.0

    config.loss.identity = 0.2                  # DECA's weight; needs the recognition network

    config.data.source = "mica"
    config.data.root = ""                       # required: MICA-format datasets root
    config.data.names = ()                      # required: dataset names under data.root
    config.data.batch_subjects = 8
    config.data.images_per_subject = 2
    config.data.image_size = 224
    config.data.num_workers = 4

    config.steps = 160_000
    config.log_every = 100
    config.checkpoint_every = 5_000
    config.eval_every = 10_000
    config.image_every = 5_000
    config.eval_batch_size = 16

    if arg == "smoke":  # the paper's model and losses at test size (still needs the files)
        config.steps = 2
        config.log_every = 1
        config.checkpoint_every = 2
        config.eval_every = 0
        config.image_every = 0
    return config
