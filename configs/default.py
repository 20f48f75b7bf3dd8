"""The regressor on the built-in default (synthetic 2D-3D data), sized for a 2-core CPU.

    python train.py --config configs/default.py --workdir runs/default        # the pipeline
    python train.py --config configs/default.py:smoke --workdir runs/smoke   # tests/CI size
    python train.py --config configs/default.py:wide --workdir runs/wide     # NoW-wide scenes
    python train.py --config configs/default.py --config.loss.id_3d=0.0 --config.seed=1 \
        --workdir runs/no_id3d_seed1                                          # the ablation

One command runs everything: (1) the CoMA encoder behind the 3D-ID loss is trained with
`config.coma` (configs/coma.py shortened to 150 steps on 1024 heads of the run's FLAME model,
drawn at the regressor's identity spread) or reused from the cache
($FACERECON_CACHE_DIR or ~/.cache/facerecon_jax)/coma/<key>; (2) 2048 synthetic training
subjects x 2 images and 32 held-out subjects are rendered once into the run's crop (dlib's
5-point face chip at 150 px, made from the head's landmarks with a detector's noise) and cached
with the frozen trunk's features (<cache>/synthetic/), from a narrowed scene distribution
(`config.data.scene`: identities at 2x FLAME's prior std, near-frontal heads, SH light, no
perspective, occluders or degradations); (3) the regressor: dlib's public-domain
face-recognition ResNet (face_recognition_models' file, read without dlib) whose `level2` stage
trains at 0.1 x the head's rate, the rest frozen, and MICA's head on its 8 x 8 x 128 map,
300 steps of 16 subjects x 2 images, AdamW 1e-3, every loss at the paper's and DECA's weights
including DECA's identity term with dlib's network (rendered terms on the first subject of each
batch); (4) held-out evaluation at steps 0, 150, 300 beside the mean face and a ridge
regression on the frozen descriptors: `workdir/evaluation.json`, `evaluation.png`.

Measured (quiet 2-core CPU, 2026-12-07; README "Training the regressor"): held-out
vertex_error_mm 9.607 -> 7.802 -> 7.077 mm against 9.532 mm for the mean face (0.742 x) and
7.844 mm for the ridge read-out; face region 4.553 mm against 6.687 mm (0.681 x); landmark
error 16.1 -> 5.6 px. From a fresh clone with empty caches: see the README (11 to 13 minutes,
peak RSS 4.4 GiB).

`:wide` (README "A wider scene distribution"): scenes as wide as the built-in NoW split's
(yaw +-40 degrees, expression std 1.0, some close-camera perspective), 15 % of the crops made
from the face box alone (as NoW crops the faces its detector misses), 400 steps: held-out
7.822 mm against 9.532 (0.821 x), ridge 8.230; NoW (built-in split) 0.984 mm against the mean
face's 1.048, below it on every challenge (seed 0; README "NoW").
"""

import pathlib

import ml_collections

from recon.options import load_config_file


def _coma_config(arg: str) -> ml_collections.ConfigDict:
    """configs/coma.py's config (the CoMA encoder of the 3D-ID loss), read from beside us."""
    return load_config_file(pathlib.Path(__file__).with_name("coma.py"), arg)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "smoke", "wide"):
        raise ValueError(f"configs/default.py: unknown argument {arg!r}; use '', 'smoke' or "
                         f"'wide'")
    config = ml_collections.ConfigDict()
    config.task = "regressor"
    config.seed = 0                         # initialisation and the per-step RNG
    config.cache_dir = ""                   # '' -> $FACERECON_CACHE_DIR or ~/.cache/facerecon_jax

    # The FLAME model: path '' = flame_jax.synthetic() (built in); else files for flame_jax.load.
    config.flame = ml_collections.ConfigDict()
    config.flame.path = ""
    config.flame.masks = ""
    config.flame.texture = ""

    # The regressor (recon.model.build.ModelOptions): dlib's public-domain face-recognition
    # ResNet with its weights (face_recognition_models), only its last stage (the 256-channel
    # levels and its fc) and MICA's head training, as the paper trains ArcFace's last blocks.
    config.model = ml_collections.ConfigDict()
    config.model.backbone = "dlib"
    config.model.stages = (1, 1, 1, 1)      # iresnet only (IResNet-100: 3, 13, 30, 3)
    config.model.width = 16                 # iresnet only (ArcFace: 64)
    config.model.embedding_size = 512       # iresnet only
    config.model.arcface_path = ""          # iresnet only: ArcFace weights; '' = random init
    config.model.dlib_path = ""             # dlib only: '' = face_recognition_models' file
    config.model.dlib_output = "level2"     # dlib only: the head reads level2's 8x8x128 map
    config.model.trainable = "last_stage"
    config.model.last_stage = ()            # () = the backbone's own last stage
    config.model.batch_norm = "running"
    config.model.trunk_cache = True         # the frozen trunk's features computed with the pool
    # dlib's features of our renders differ little between faces next to their mean: each is
    # standardised by the training data's statistics (not MICA's L2 normalisation).
    config.model.feature_norm = "data"
    config.model.head_hidden_size = 300     # MICA's mapping MLP
    config.model.head_num_hidden = 3
    config.model.dtype = "float32"
    config.model.param_dtype = "float32"
    config.model.precision = "default"

    # DECA's identity term's frozen face-recognition network: dlib's, as it ships.
    config.recognition = ml_collections.ConfigDict()
    config.recognition.network = "dlib"
    config.recognition.path = ""

    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 1e-3
    config.optim.weight_decay = 2e-4
    config.optim.warmup_steps = 20
    config.optim.final_lr_fraction = 0.05   # cosine decay to this fraction of the peak
    config.optim.grad_clip_norm = 10.0      # 0 = off
    config.optim.backbone_lr_scale = 0.1    # the trainable backbone parts' rate / the head's

    # Loss weights (recon.objective.LossWeights): the paper's w3d 0.4, w2d 0.6, vertex 0.5,
    # 3D-ID 0.5 and DECA's 2D weights. A zero switches a term off and skips its computation
    # (the paper's ablation: --config.loss.id_3d=0.0).
    config.loss = ml_collections.ConfigDict()
    config.loss.w3d = 0.4
    config.loss.w2d = 0.6
    config.loss.vertex = 0.5
    config.loss.id_3d = 0.5
    config.loss.landmark = 1.0
    config.loss.eye_closure = 1.0
    config.loss.lip_distance = 0.5
    config.loss.photometric = 2.0
    config.loss.identity = 0.2
    config.loss.shape_consistency = 1.0
    config.loss.shape_reg = 1e-4
    config.loss.expression_reg = 1e-4
    config.loss.texture_reg = 1e-4
    config.loss.light_reg = 1.0
    config.loss.id_3d_kind = "squared_l2"
    config.loss.regulariser_reduction = "sum"   # DECA's: summed over the batch
    config.loss.image_subjects = 1          # rendered terms on the first N subjects; 0 = all

    config.data = ml_collections.ConfigDict()
    config.data.source = "synthetic"        # or "mica" (data.root, data.names)
    config.data.root = ""
    config.data.names = ()
    # The face crop (recon.image.CropSpec), stored with the checkpoints and used by every
    # prediction: dlib's 5-point face chip, the input its network was trained on.
    config.data.crop = ml_collections.ConfigDict()
    config.data.crop.anchor = "dlib_five_points"
    config.data.crop.size = 150
    config.data.crop.scale = 1.6            # box anchor only
    config.data.crop.box_side = "mean"      # box anchor only
    config.data.crop.padding = 0.25         # dlib anchor only
    config.data.image_size = 64             # the 2D losses' image: the crop at 64 px
    config.data.batch_subjects = 16
    config.data.images_per_subject = 2
    config.data.num_train_subjects = 2048
    config.data.pool = True                 # render the subjects once, cache, serve from memory
    config.data.num_eval_subjects = 32
    config.data.num_workers = 0
    config.data.seed = 0
    config.data.mica_landmarks = "detected"
    # How widely the synthetic images vary (recon.data.sources.SceneOptions; its defaults are the
    # wide ones of recon.data.synthetic.SyntheticConfig). landmark_noise: the detector's error
    # the training crops are made with (measured for MediaPipe on our renders, README).
    config.data.scene = ml_collections.ConfigDict()
    config.data.scene.shape_std = 2.0
    config.data.scene.expression_std = 0.7
    config.data.scene.max_yaw_deg = 15.0
    config.data.scene.max_pitch_deg = 8.0
    config.data.scene.max_roll_deg = 5.0
    config.data.scene.landmark_noise = 0.02
    config.data.scene.box_scale_jitter = 0.03
    config.data.scene.box_shift_jitter = 0.02
    config.data.scene.fallback_crop_probability = 0.0   # crops from the face box alone
    config.data.scene.perspective_probability = 0.0
    config.data.scene.lambert_probability = 0.0
    config.data.scene.specular_probability = 0.0
    config.data.scene.degradations = "clean"

    # The CoMA encoder of the 3D-ID loss: configs/coma.py, shortened; trained once on heads of
    # the run's FLAME model and cached per (config, mesh hierarchy, FLAME digest), or taken
    # from coma_checkpoint_dir.
    config.coma_checkpoint_dir = ""
    config.coma = _coma_config("smoke" if arg == "smoke" else "")
    config.coma.steps = 150
    config.coma.data.num_train = 1024
    config.coma.data.num_test = 128
    config.coma.checkpoint_every = 150
    # The encoder must know the meshes it will compare: heads drawn as the regressor's targets.
    config.coma.data.shape_std = config.data.scene.shape_std

    # Extra evaluation: the NoW validation score every eval_every steps when now_root is set.
    config.eval = ml_collections.ConfigDict()
    config.eval.now_root = ""
    config.eval.now_split = "val"
    config.eval.now_workers = 0

    config.steps = 300
    config.log_every = 25
    config.checkpoint_every = 150
    config.eval_every = 150                 # held-out evaluation (also at step 0 and the end)
    config.image_every = 150                # PNG grids of an eval batch; 0 = off
    config.eval_batch_size = 16             # a multiple of the device count and of K
    config.max_checkpoints = 3

    if arg == "wide":
        # Scenes as wide as the built-in NoW split's (README "NoW"): yaw +-40 degrees, stronger
        # expressions, close-camera perspective on 30 %, and 15 % of the crops made from the
        # face box alone, as NoW's prediction crops the faces its detector misses (occluded
        # ones, mostly); no painted occluders (they did not help NoW's occlusion images:
        # README); 400 steps. Its held-out images are of the same wide scenes, each cropped
        # from its landmarks.
        config.data.scene.expression_std = 1.0
        config.data.scene.max_yaw_deg = 40.0
        config.data.scene.max_pitch_deg = 10.0
        config.data.scene.max_roll_deg = 6.0
        config.data.scene.perspective_probability = 0.3
        config.data.scene.fallback_crop_probability = 0.15
        config.steps = 400
        config.checkpoint_every = 200
        config.eval_every = 200
        config.image_every = 200

    if arg == "smoke":
        config.model.head_hidden_size = 32
        config.model.head_num_hidden = 1
        config.data.batch_subjects = 4      # a batch of 8: runs on 1, 2, 4 and 8 devices
        config.data.num_train_subjects = 8
        config.data.num_eval_subjects = 4
        config.coma.steps = 2
        config.coma.checkpoint_every = 2
        config.steps = 3
        config.log_every = 1
        config.checkpoint_every = 2
        config.eval_every = 0
        config.image_every = 2
        config.eval_batch_size = 8
        config.optim.warmup_steps = 0
    return config
