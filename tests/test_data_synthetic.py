"""Synthetic 2D-3D pairs (`recon.data.synthetic`): fields, determinism, held-out split,
landmarks against the rendered face and the crop matrix, occluders outside the skin mask.

One render compilation (the default box crop, 224 x 224, K = 2) is shared by most of the module:
configs differ only in data, never in the static render settings. (That the rendered crop equals
the crop `recon.image.crop_image` cuts from a photo of the same head: tests/test_image.py.)
"""

import dataclasses
import pickle

import numpy as np
import pytest

from recon.data import augment, pipeline, synthetic
from recon.image import crop as crop_lib
from recon.image import preprocess

SEED = 5
SUBJECT = 7


@pytest.fixture(scope="module")
def model(synthetic_model):
    return synthetic_model


@pytest.fixture(scope="module")
def host(model):
    return synthetic.HostModel.from_model(model)


@pytest.fixture(scope="module")
def subject(model, host):
    return synthetic.make_subject(model, synthetic.SyntheticConfig(), SUBJECT, range(2), SEED,
                                  host)


def _plain_config(**changes):
    """No perspective, no crop jitter, no occluders, no degradations (same render settings)."""
    base = dict(perspective_probability=0.0, box_scale_jitter=0.0, box_shift_jitter=0.0,
                augment=augment.AugmentConfig.clean())
    base.update(changes)
    return synthetic.SyntheticConfig(**base)


def test_fields_shapes_dtypes_and_ranges(subject, model):
    k = 2
    assert subject["crops"].shape == subject["images"].shape == (k, 224, 224, 3)
    assert subject["skin_masks"].shape == (k, 224, 224)
    assert subject["vertices"].shape == (k, 5023, 3)
    assert 0.0 <= subject["images"].min() and subject["images"].max() <= 1.0
    assert subject["images"].std() > 0.05  # not a blank image
    assert set(np.unique(subject["skin_masks"])) <= {0.0, 1.0}
    assert 0.02 < subject["skin_masks"].mean() < 0.8
    assert set(np.unique(subject["landmark_weights"])) <= {0.0, 1.0}
    np.testing.assert_array_equal(subject["has_3d"], 1.0)
    np.testing.assert_array_equal(subject["subject_ids"], SUBJECT)
    # Metres: a head is ~0.2-0.35 m across, not mm or cm.
    extent = subject["vertices"][0].max(0) - subject["vertices"][0].min(0)
    assert np.all((extent > 0.15) & (extent < 0.4)), extent


def test_neutral_mesh_is_the_identity_with_zero_pose_and_expression(subject, model, host):
    # Same identity in both images: identical neutral meshes, different images.
    np.testing.assert_array_equal(subject["vertices"][0], subject["vertices"][1])
    assert np.abs(subject["landmarks"][0] - subject["landmarks"][1]).max() > 1.0
    # Independent numpy reference: with zero pose FLAME is template + shapedirs @ shape.
    scenes = synthetic.sample_scenes(host, synthetic.SyntheticConfig(), SUBJECT, [0], SEED)
    reference = (np.asarray(model.v_template, np.float64)
                 + np.asarray(model.shapedirs, np.float64) @ scenes.shape[0].astype(np.float64))
    np.testing.assert_allclose(subject["vertices"][0], reference, atol=2e-6)


def test_deterministic_by_seed_subject_and_image(model, host, subject):
    config = synthetic.SyntheticConfig()
    again = synthetic.make_subject(model, config, SUBJECT, range(2), SEED, host)
    for name in subject:
        np.testing.assert_array_equal(again[name], subject[name], err_msg=name)
    # An image depends only on (seed, subject, image index), not on its batch companions.
    swapped = synthetic.make_subject(model, config, SUBJECT, [1, 0], SEED, host)
    for name in subject:
        np.testing.assert_array_equal(swapped[name][0], subject[name][1], err_msg=name)
    other_seed = synthetic.make_subject(model, config, SUBJECT, range(2), SEED + 1, host)
    assert np.abs(other_seed["vertices"] - subject["vertices"]).max() > 1e-3
    assert np.abs(other_seed["images"] - subject["images"]).mean() > 0.02


def test_heldout_subjects_never_seen_in_training(host):
    ranges = [synthetic.TRAIN_SUBJECTS, synthetic.HELDOUT_SUBJECTS,
              synthetic.NOW_SYNTHETIC_SUBJECTS]
    for i, a in enumerate(ranges):
        for b in ranges[i + 1:]:
            assert a.stop <= b.start or b.stop <= a.start, (a, b)
    # Identities differ between the splits (and between subjects).
    config = synthetic.SyntheticConfig()
    train = np.stack([synthetic.sample_scenes(host, config, s, [0], 0).shape[0]
                      for s in synthetic.TRAIN_SUBJECTS[:20]])
    held = np.stack([synthetic.sample_scenes(host, config, s, [0], 0).shape[0]
                     for s in synthetic.HELDOUT_SUBJECTS[:20]])
    distances = np.linalg.norm(train[:, None] - held[None], axis=-1)
    assert distances.min() > 1.0  # shape vectors of std 1 in 300-d: typical distance ~24


def _render(model, host, config, subject, seed=SEED):
    scenes = synthetic.sample_scenes(host, config, subject, range(2), seed)
    rendered, geometry = synthetic.render_batch(model, config, scenes)
    return scenes, rendered, geometry


def test_landmarks_lie_on_the_rendered_face_and_where_the_crop_puts_them(model, host):
    config = _plain_config()
    scenes, rendered, geometry = _render(model, host, config, 11)
    for k in range(2):
        landmarks = rendered["landmarks"][k]
        rows = np.clip(np.floor(landmarks[:, 1]).astype(int), 0, 223)
        cols = np.clip(np.floor(landmarks[:, 0]).astype(int), 0, 223)
        covered = rendered["alpha"][k][rows, cols] > 0.5
        assert covered.mean() >= 0.9, covered.mean()
        inner = rendered["face_region"][k][rows[17:], cols[17:]] > 0  # 51 inner points
        assert inner.mean() >= 0.8, inner.mean()
        # The rendered landmarks are the detector's (exact here) points under the crop matrix.
        np.testing.assert_allclose(
            landmarks, crop_lib.transform_points(geometry.matrix[k], geometry.detected[k]),
            atol=2e-2)
    # The box crop without jitter: the detector-like box around the landmarks (its top raised
    # for the forehead) is centred and its mean side is 224 / 1.6.
    for k in range(2):
        box = crop_lib.box_from_landmarks(rendered["landmarks"][k])
        np.testing.assert_allclose((box[:2] + box[2:]) / 2, 112.0, atol=2e-2)
        np.testing.assert_allclose(np.mean(box[2:] - box[:2]), 224 / 1.6, rtol=1e-3)
    # Landmark noise moves the crop, not the ground truth: the rendered points stay on the face.
    noisy = _plain_config(landmark_noise=0.05)
    _, rendered_noisy, geometry_noisy = _render(model, host, noisy, 11)
    assert np.abs(geometry_noisy.matrix - geometry.matrix).max() > 1e-3


def test_loss_image_is_the_crop_resized(model, host):
    config = _plain_config(image_size=64)
    subject = synthetic.make_subject(model, config, 4, range(2), SEED, host)
    assert subject["crops"].shape == (2, 224, 224, 3) and subject["images"].shape == (2, 64, 64, 3)
    np.testing.assert_allclose(subject["images"], preprocess.resize(subject["crops"], 64),
                               atol=1e-6)
    full = synthetic.make_subject(model, _plain_config(), 4, range(2), SEED, host)
    np.testing.assert_allclose(subject["landmarks"], full["landmarks"] * 64 / 224, atol=1e-4)


def test_skin_mask_excludes_occluders(model, host):
    config = _plain_config(augment=dataclasses.replace(augment.AugmentConfig.clean(),
                                                       occluder_probability=1.0))
    _, rendered, _ = _render(model, host, config, 3)
    overlapped = 0
    for k in range(2):
        example, layers = synthetic.compose_example(
            {name: value[k] for name, value in rendered.items()}, config, seed=SEED,
            subject_index=3, image_index=k)
        occluded = layers.occluder_alpha > 0
        assert occluded.any()
        assert np.all(example["skin_masks"][occluded] == 0)
        face = rendered["face_region"][k] > 0
        np.testing.assert_array_equal(example["skin_masks"][face & ~occluded], 1.0)
        assert np.all(example["skin_masks"][~face] == 0)
        overlapped += int((face & occluded).sum() > 50)
        # Where the occluder is opaque the image shows the occluder, not the face.
        opaque = layers.occluder_alpha > 0.99
        assert opaque.any()
    assert overlapped >= 1  # the occluders really cover face pixels


def test_source_pickles_for_worker_processes(model, subject):
    source = synthetic.SyntheticSource(model, synthetic.SyntheticConfig(), backbone_kind="dlib",
                                       subjects=range(SUBJECT, SUBJECT + 3),
                                       images_per_subject=2, seed=SEED)
    clone = pickle.loads(pickle.dumps(source))
    assert len(clone) == 3
    record = clone[0]
    pipeline.check_example(record, leading=1)
    for name in subject:
        if name != "crops":
            np.testing.assert_array_equal(record[name], subject[name], err_msg=name)
    np.testing.assert_allclose(record["backbone_inputs"],
                               preprocess.backbone_input(subject["crops"], "dlib"), atol=1e-4)
    with pytest.raises(ValueError, match="images_per_subject"):
        synthetic.SyntheticSource(model, images_per_subject=0)


def test_augment_functions_are_deterministic_and_in_range():
    rng = lambda: np.random.default_rng(3)  # noqa: E731
    for make in (lambda r: augment.background(r, (64, 48)),
                 lambda r: augment.degrade(r, np.full((64, 48, 3), 0.5, np.float32)),
                 lambda r: augment.occluders(r, (64, 48), np.asarray([10, 10, 40, 50]),
                                             augment.AugmentConfig(occluder_probability=1.0))[1]):
        a, b = make(rng()), make(rng())
        np.testing.assert_array_equal(a, b)
        assert a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1
    image = augment.background(np.random.default_rng(0), (32, 32))
    decoded = augment.jpeg(image, 95)
    assert decoded.shape == image.shape and np.abs(decoded - image).mean() < 0.08
    assert np.abs(augment.jpeg(image, 10) - image).mean() > np.abs(decoded - image).mean()


def test_loader_over_heldout_subjects(model):
    source = synthetic.SyntheticSource(model, synthetic.SyntheticConfig(),
                                       backbone_kind="arcface",
                                       subjects=synthetic.HELDOUT_SUBJECTS[:4],
                                       images_per_subject=2, seed=SEED)
    loader = pipeline.make_loader(source, batch_subjects=2, images_per_subject=2, seed=0,
                                  shuffle=False, num_epochs=1)
    batches = list(loader)
    assert len(batches) == 2
    ids = np.concatenate([b["subject_ids"] for b in batches])
    np.testing.assert_array_equal(ids, np.repeat(np.arange(4) + synthetic.HELDOUT_SUBJECTS[0], 2))
    assert not any(int(i) in synthetic.TRAIN_SUBJECTS for i in ids)
    for batch in batches:
        pipeline.batch_from_numpy(batch)


def test_scene_degradations_name_their_augmentation():
    from recon.data import sources

    def augment_of(mode):
        options = sources.DataOptions(scene=sources.SceneOptions(degradations=mode))
        return sources.synthetic_config(options).augment

    full, occluders, clean = augment_of("full"), augment_of("occluders"), augment_of("clean")
    assert full == augment.AugmentConfig() and clean == augment.AugmentConfig.clean()
    # Occluders at the full rate, and nothing else of the photo degradations.
    assert occluders.occluder_probability == full.occluder_probability > 0
    assert occluders.occluder_size == full.occluder_size
    assert dataclasses.replace(occluders, occluder_probability=0.0) == clean
    with pytest.raises(ValueError, match="degradations must be one of"):
        sources.SceneOptions(degradations="heavy")


def test_fallback_crops_place_the_template_on_the_jittered_box(model, host):
    """fallback_crop_probability = 1: every image is cropped as a prediction crops a face whose
    landmarks were not found (the template's landmarks scaled and shifted onto the face box, no
    rotation); every other draw of the image is the same as without fallback crops."""
    from recon.data import sources

    aligned = _plain_config(box_scale_jitter=0.1, box_shift_jitter=0.05, max_roll_deg=12.0)
    fallback = dataclasses.replace(aligned, fallback_crop_probability=1.0)
    scenes = synthetic.sample_scenes(host, aligned, 11, range(2), SEED)
    scenes_fallback = synthetic.sample_scenes(host, fallback, 11, range(2), SEED)
    assert scenes.fallback_crop.tolist() == [0.0, 0.0]
    assert scenes_fallback.fallback_crop.tolist() == [1.0, 1.0]
    for field in dataclasses.fields(scenes):
        if field.name != "fallback_crop":
            np.testing.assert_array_equal(getattr(scenes, field.name),
                                          getattr(scenes_fallback, field.name))

    # The geometry (host only), with dlib's 5-point chip, the anchor that rotates the crop.
    dlib_spec = crop_lib.CropSpec(anchor="dlib_five_points", size=150, padding=0.25)
    aligned = dataclasses.replace(aligned, crop=dlib_spec)
    fallback = dataclasses.replace(fallback, crop=dlib_spec)
    landmarks_3d = np.asarray(synthetic.scene_landmarks(model, scenes), np.float64)
    template = crop_lib.template_points(model)
    plain = synthetic.crop_geometry(landmarks_3d, scenes, aligned)
    moved = synthetic.crop_geometry(landmarks_3d, scenes_fallback, fallback, template)
    for k in range(2):
        exact_box = crop_lib.box_from_landmarks(crop_lib.reference_points(landmarks_3d[k]))
        (centre, side), (box_centre, box_side) = (crop_lib.centre_and_side(exact_box),
                                                  crop_lib.centre_and_side(moved.box[k]))
        jitter = scenes.box_jitter[k]
        np.testing.assert_allclose(box_centre, centre + 0.05 * jitter[1:] * (
            exact_box[2:] - exact_box[:2]), atol=1e-6)
        assert box_side == pytest.approx(side * (1.0 + 0.1 * float(jitter[0])), rel=1e-6)
        # The reported points are the template, only scaled and shifted, with their box's
        # centre and mean side those of the jittered box ...
        placed_centre, placed_side = crop_lib.centre_and_side(
            crop_lib.box_from_landmarks(moved.detected[k]))
        np.testing.assert_allclose(placed_centre, box_centre, atol=1e-6)
        assert placed_side == pytest.approx(box_side, rel=1e-9)
        offset = moved.detected[k] - template * (box_side / crop_lib.centre_and_side(
            crop_lib.box_from_landmarks(template))[1])
        np.testing.assert_allclose(offset, np.broadcast_to(offset[0], offset.shape), atol=1e-6)
        # ... and they make the crop, which is not the aligned one.
        np.testing.assert_allclose(moved.matrix[k], crop_lib.crop_matrix(
            dlib_spec, box=moved.box[k], landmarks=moved.detected[k]), atol=1e-9)
        assert np.abs(moved.matrix[k] - plain.matrix[k]).max() > 1e-2
    with pytest.raises(ValueError, match="template"):
        synthetic.crop_geometry(landmarks_3d, scenes_fallback, fallback)
    with pytest.raises(ValueError, match="fallback_crop_probability"):
        sources.SceneOptions(fallback_crop_probability=1.5)
    with pytest.raises(ValueError, match="fallback_crop_probability is a synthetic-data option"):
        sources.make_train_source(model, sources.DataOptions(
            source="mica", scene=sources.SceneOptions(fallback_crop_probability=0.2)),
            backbone_kind="dlib")
    # render_batch finds the template itself (the module's shared box-crop compilation).
    box_fallback = _plain_config(fallback_crop_probability=1.0)
    _, _, geometry = _render(model, host, box_fallback, 11)
    scenes_box = synthetic.sample_scenes(host, box_fallback, 11, range(2), SEED)
    expected = synthetic.crop_geometry(
        np.asarray(synthetic.scene_landmarks(model, scenes_box), np.float64), scenes_box,
        box_fallback, template)
    np.testing.assert_allclose(geometry.detected, expected.detected, atol=1e-9)
