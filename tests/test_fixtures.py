"""Self-tests of the shared fixtures in conftest.py."""

import numpy as np
import pytest


def test_run_with_cpu_devices_sees_the_devices(run_with_cpu_devices):
    out = run_with_cpu_devices("import jax; print(jax.device_count(), jax.devices()[0].platform)",
                               num_devices=3)
    assert out.split() == ["3", "cpu"]


def test_run_with_cpu_devices_reports_failures(run_with_cpu_devices):
    with pytest.raises(pytest.fail.Exception, match=r"(?s)exited with 1.*ZeroDivisionError"):
        run_with_cpu_devices("1 / 0", num_devices=2)
    np.testing.assert_equal(int(run_with_cpu_devices("print(6 * 7)", num_devices=1)), 42)


def test_asset_fixtures(flame_topology, landmark_embedding, synthetic_model):
    assert flame_topology["v_template"].shape == (5023, 3)
    assert flame_topology["faces"].shape == (9976, 3) and flame_topology["faces"].dtype == np.int32
    assert landmark_embedding["dynamic_lmk_faces"].shape == (79, 17)
    with pytest.raises(ValueError, match="read-only"):
        flame_topology["v_template"][0, 0] = 1.0  # shared by the session: must not be written
    np.testing.assert_array_equal(np.asarray(synthetic_model.faces), flame_topology["faces"])


def test_asset_fixtures_equal_the_raw_files(flame_topology, landmark_embedding):
    """Independent reference for every test using the fixtures: the npz files read with np.load."""
    from flame_jax import shipped

    with np.load(shipped.TOPOLOGY_PATH) as data:
        np.testing.assert_array_equal(flame_topology["v_template"], data["v_template"])
        np.testing.assert_array_equal(flame_topology["shapedirs_id60"], data["shapedirs"])
        np.testing.assert_array_equal(flame_topology["faces"], data["faces"])
    with np.load(shipped.LANDMARK_EMBEDDING_PATH) as data:
        assert sorted(data.files) == sorted(landmark_embedding)
        for key in data.files:
            np.testing.assert_array_equal(landmark_embedding[key], data[key])
