"""The grain input pipeline (`recon.data.pipeline`) and the MICA-format reader (`recon.data.mica`)
on a small tree the tests write: fields, subject-major batches, resume from a saved iterator
state, host sharding, worker processes, and errors that name the missing file."""

import json

import cv2
import numpy as np
import pytest

from flame_jax.errors import FlameFileError, FlameFileNotFoundError
from recon.data import mica, pipeline
from recon.types import Batch

K = 2


@pytest.fixture(scope="module")
def model(synthetic_model):
    return synthetic_model


@pytest.fixture(scope="module")
def tree(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("mica")
    shapes = mica.write_tiny_tree(root, model, name="TINY", actors=6, images_per_actor=3)
    return root, shapes


@pytest.fixture(scope="module")
def dataset(tree, model):
    return mica.MicaDataset(tree[0], ["TINY"], model=model, images_per_subject=K, seed=1)


def test_mica_record_fields_and_values(dataset, tree, model):
    root, shapes = tree
    record = dataset[4]
    pipeline.check_example(record, leading=1)
    assert record["images"].shape == (K, 224, 224, 3)
    np.testing.assert_array_equal(record["subject_ids"], 4)
    np.testing.assert_array_equal(record["has_3d"], 1.0)
    np.testing.assert_array_equal(record["landmark_weights"], 0.0)  # photos: no landmarks
    np.testing.assert_array_equal(record["skin_masks"], 0.0)        # -> rendered face region
    # Neutral mesh = template + shapedirs @ betas[:300] (zero pose: LBS is the identity).
    name, actor, images, _ = dataset.actors[4]
    reference = (np.asarray(model.v_template, np.float64)
                 + np.asarray(model.shapedirs, np.float64) @ shapes[actor].astype(np.float64))
    np.testing.assert_allclose(record["vertices"][0], reference, atol=2e-6)
    np.testing.assert_array_equal(record["posed_vertices"], record["vertices"])
    # Images are the actor's files (RGB), the backbone input is MICA's blob of the same file.
    decoded = [cv2.cvtColor(cv2.imread(str(dataset.image_path(name, p))), cv2.COLOR_BGR2RGB)
               for p in images]
    for k in range(K):
        matches = [np.array_equal(record["images"][k], d.astype(np.float32) / 255)
                   for d in decoded]
        assert sum(matches) == 1
        path = dataset.image_path(name, images[matches.index(True)])
        blob = np.load(str(path)[:-4] + ".npy").transpose(1, 2, 0)
        np.testing.assert_array_equal(record["backbone_images"][k], blob)
    assert not np.array_equal(record["images"][0], record["images"][1])  # without replacement


def test_mica_missing_files_are_named(tree, model, tmp_path):
    root, _ = tree
    with pytest.raises(FlameFileNotFoundError, match="NOPE"):
        mica.MicaDataset(root, ["NOPE"], model=model)
    (root / "EMPTY").mkdir(exist_ok=True)
    with pytest.raises(FlameFileNotFoundError, match=r"image_paths/EMPTY\.npy"):
        mica.MicaDataset(root, ["EMPTY"], model=model)
    # A tree whose files go missing after indexing: the error names the file.
    broken_root = tmp_path / "broken"
    mica.write_tiny_tree(broken_root, model, name="B", actors=1, images_per_actor=2)
    dataset = mica.MicaDataset(broken_root, ["B"], model=model, images_per_subject=2)
    image = dataset.image_path("B", dataset.actors[0][2][1])
    image.unlink()
    with pytest.raises(FlameFileNotFoundError, match=str(image)):
        dataset[0]
    params = dataset.parameter_path("B", dataset.actors[0][3])
    params.unlink()
    with pytest.raises(FlameFileNotFoundError, match=str(params)):
        dataset.neutral_vertices(0)
    np.savez(params, betas=np.zeros(400, np.float32))
    with pytest.raises(FlameFileError, match="missing key 'pose'"):
        dataset.neutral_vertices(0)
    np.savez(params, betas=np.full(400, np.nan, np.float32), pose=np.zeros(15, np.float32))
    with pytest.raises(FlameFileError, match="NaN"):
        dataset.neutral_vertices(0)
    lists = broken_root / "image_paths" / "B.npy"
    np.save(lists, np.arange(3))
    with pytest.raises(FlameFileError, match="expected a non-empty dict"):
        mica.MicaDataset(broken_root, ["B"], model=model)


def test_mica_without_blobs_uses_the_crop(tmp_path, model):
    from recon.backbone.preprocess import backbone_input_from_crop
    mica.write_tiny_tree(tmp_path, model, name="N", actors=1, images_per_actor=2, blobs=False)
    record = mica.MicaDataset(tmp_path, ["N"], model=model)[0]
    np.testing.assert_allclose(record["backbone_images"],
                               backbone_input_from_crop(record["images"], max_value=1.0))


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _equal(a, b):
    return all(np.array_equal(a[name], b[name]) for name in pipeline.FIELDS)


def test_batches_are_subject_major_and_convert_to_batch(dataset):
    loader = pipeline.make_loader(dataset, batch_subjects=3, images_per_subject=K, seed=0)
    batch = next(loader)
    assert batch["images"].shape == (3 * K, 224, 224, 3)
    ids = batch["subject_ids"].reshape(3, K)
    assert np.all(ids == ids[:, :1]) and len(set(ids[:, 0])) == 3
    for s in range(3):  # rows of one subject share its neutral mesh
        np.testing.assert_array_equal(batch["vertices"][s * K], batch["vertices"][s * K + 1])
    converted = pipeline.batch_from_numpy(batch)
    assert isinstance(converted, Batch) and converted.batch_size == 3 * K
    bad = dict(batch, landmarks=batch["landmarks"][:, :60])
    with pytest.raises(ValueError, match="'landmarks'"):
        pipeline.batch_from_numpy(bad)
    bad = dict(batch, vertices=batch["vertices"].astype(np.float64))
    with pytest.raises(ValueError, match="'vertices' has dtype float64"):
        pipeline.batch_from_numpy(bad)
    with pytest.raises(ValueError, match="missing fields \\['has_3d'\\]"):
        pipeline.batch_from_numpy({k: v for k, v in batch.items() if k != "has_3d"})


def test_saved_state_resumes_the_exact_next_batches(dataset):
    first = pipeline.make_loader(dataset, batch_subjects=2, images_per_subject=K, seed=4)
    _take(first, 2)
    saved = json.loads(json.dumps({"data": first.get_state().decode()}))  # as in a checkpoint
    expected = _take(first, 3)  # crosses the epoch boundary (6 actors / 2 per batch)
    resumed = pipeline.make_loader(dataset, batch_subjects=2, images_per_subject=K, seed=4)
    resumed.set_state(saved["data"])
    for want, got in zip(expected, _take(resumed, 3)):
        assert _equal(want, got)
    # A different seed gives a different order (the test above can fail).
    other = pipeline.make_loader(dataset, batch_subjects=2, images_per_subject=K, seed=5)
    orders = [tuple(b["subject_ids"]) for b in _take(other, 3)]
    assert orders != [tuple(b["subject_ids"]) for b in expected]


def test_two_shards_split_the_subjects_without_overlap(dataset):
    seen = []
    for shard in range(2):
        loader = pipeline.make_loader(dataset, batch_subjects=2, images_per_subject=K, seed=0,
                                      shard_index=shard, shard_count=2, num_epochs=1)
        ids = [int(i) for batch in loader for i in batch["subject_ids"][::K]]
        seen.append(set(ids))
        assert len(ids) == 3  # 6 actors / 2 shards, one subject per host per step
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(6))
    with pytest.raises(ValueError, match="divisible"):
        pipeline.make_loader(dataset, batch_subjects=3, images_per_subject=K, seed=0,
                             shard_count=2)
    with pytest.raises(ValueError, match="images per subject"):
        pipeline.make_loader(dataset, batch_subjects=2, images_per_subject=3, seed=0)


def test_worker_processes_serve_and_resume(dataset):
    loader = pipeline.make_loader(dataset, batch_subjects=2, images_per_subject=K, seed=2,
                                  num_workers=2)
    first = next(loader)
    state = loader.get_state()
    assert json.loads(state)["worker_count"] == 2
    expected = _take(loader, 2)
    resumed = pipeline.make_loader(dataset, batch_subjects=2, images_per_subject=K, seed=2,
                                   num_workers=2)
    resumed.set_state(state)
    for want, got in zip(expected, _take(resumed, 2)):
        assert _equal(want, got)
    pipeline.check_example(first, leading=1)
    del loader, resumed
