"""recon.training: config -> dataclasses, the run checkpointer (round trip, config mismatch),
the non-finite guard under jit, the metrics file, and the sharding helpers on 8 CPU devices."""

import dataclasses
import json
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import struct

from recon import options as config_lib
from recon.training import checkpoints, guard, metrics, sharding


@dataclasses.dataclass(frozen=True)
class Inner:
    size: int = 3
    rate: float = 0.5
    filters: Tuple[int, ...] = (1, 2)


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = Inner()
    limit: Optional[int] = None


def _config(**overrides):
    config = ml_collections.ConfigDict({"name": "a", "inner": {"size": 4, "rate": 1,
                                                               "filters": [5, 6, 7]}})
    config.update(overrides)
    return config


def test_to_dataclass_builds_nested_frozen_dataclasses():
    built = config_lib.to_dataclass(_config(), Outer)
    assert built == Outer(name="a", inner=Inner(size=4, rate=1.0, filters=(5, 6, 7)))
    assert isinstance(built.inner.rate, float) and isinstance(built.inner.filters, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.name = "b"
    assert config_lib.to_dataclass({"name": "x"}, Outer) == Outer(name="x")  # defaults kept


def test_to_dataclass_rejects_unknown_missing_and_mistyped_keys():
    config = _config()
    config.inner.sise = 1
    config.extra_key = 2
    with pytest.raises(ValueError, match=r"\['extra_key'\]"):
        config_lib.to_dataclass(config, Outer)
    del config["extra_key"]
    with pytest.raises(ValueError, match=r"\['inner\.sise'\]"):
        config_lib.to_dataclass(config, Outer)
    with pytest.raises(ValueError, match="'name' is required"):
        config_lib.to_dataclass({"inner": {}}, Outer)
    with pytest.raises(TypeError, match=r"inner\.size: expected an int"):
        config_lib.to_dataclass({"name": "a", "inner": {"size": "4"}}, Outer)
    with pytest.raises(TypeError, match=r"inner\.filters\[1\]"):
        config_lib.to_dataclass({"name": "a", "inner": {"filters": [1, 2.5]}}, Outer)


@struct.dataclass
class State:
    step: jax.Array
    params: dict
    first_nonfinite_step: jax.Array


def _state(value=1.0):
    return State(step=jnp.asarray(0, jnp.int32),
                 params={"w": jnp.full((3, 2), value, jnp.float32), "b": jnp.arange(2.0)},
                 first_nonfinite_step=guard.no_nonfinite_step())


def test_checkpointer_round_trip_latest_and_max_to_keep(tmp_path):
    config = _config()
    with checkpoints.RunCheckpointer(tmp_path / "ckpt", config=config, max_to_keep=2) as saver:
        assert saver.latest_step() is None
        for step in (1, 2, 3):
            state = _state(float(step)).replace(step=jnp.asarray(step, jnp.int32))
            saver.save(step, state, extra={"data": {"epoch": step, "position": 2 * step}})
    with checkpoints.RunCheckpointer(tmp_path / "ckpt", config=config, max_to_keep=2) as saver:
        assert saver.latest_step() == 3 and saver.all_steps() == (2, 3)  # step 1 deleted
        restored, extra = saver.restore(3, _state(0.0))
    assert extra == {"data": {"epoch": 3, "position": 6}}
    assert int(restored.step) == 3
    np.testing.assert_array_equal(restored.params["w"], np.full((3, 2), 3.0, np.float32))
    np.testing.assert_array_equal(restored.params["b"], [0.0, 1.0])
    assert restored.params["w"].dtype == jnp.float32


def test_checkpointer_refuses_a_different_config_naming_keys(tmp_path):
    with checkpoints.RunCheckpointer(tmp_path, config=_config()) as saver:
        saver.save(5, _state())
    changed = _config(name="b")
    changed.inner.filters = (5, 6)
    changed.new_key = 1
    with pytest.raises(checkpoints.ConfigMismatchError) as error:
        checkpoints.RunCheckpointer(tmp_path, config=changed)
    message = str(error.value)
    assert "name: 'a' -> 'b'" in message
    assert "inner.filters: [5, 6, 7] -> [5, 6]" in message
    assert "new_key: <absent> -> 1" in message and "inner.size" not in message
    # keys declared as not affecting the result may differ
    checkpoints.RunCheckpointer(tmp_path, config=_config(name="b"), ignore_keys=("name",)).close()


def test_checkpointer_errors(tmp_path):
    with checkpoints.RunCheckpointer(tmp_path, config=_config()) as saver:
        saver.save(1, _state())
        with pytest.raises(checkpoints.CheckpointRestoreError, match="no step 7"):
            saver.restore(7, _state())
        with pytest.raises(checkpoints.CheckpointRestoreError, match="step 1"):
            saver.restore(1, {"other": jnp.zeros(3)})  # another structure
        with pytest.raises(FloatingPointError, match="non-finite"):
            saver.save(2, _state(float("nan")))
        with pytest.raises(FloatingPointError, match="step 4"):
            saver.save(2, _state().replace(first_nonfinite_step=jnp.asarray(4, jnp.int32)))
        assert saver.all_steps() == (1,)


def test_guard_keeps_old_state_and_names_first_bad_step():
    @jax.jit
    def step_fn(state, scale):
        # loss = scale * sum(w): scale = nan or inf makes the update non-finite
        loss, grads = jax.value_and_grad(lambda p: scale * jnp.sum(p["w"]))(state.params)
        proposed = state.replace(step=state.step + 1,
                                 params=jax.tree.map(lambda p, g: p - 0.1 * g, state.params,
                                                     {"w": grads["w"], "b": state.params["b"]}))
        return guard.guarded_update(state, proposed, loss, state.step + 1, also_check=grads)

    state = _state()
    history = []
    for scale in [1.0, 1.0, np.nan, 1.0, np.inf, 1.0]:
        state = step_fn(state, jnp.float32(scale))
        history.append(float(state.params["w"][0, 0]))
    assert int(state.step) == 6
    assert guard.first_nonfinite_step(state) == 3  # the first bad update, 1-based
    # steps 3 and 5 were rejected: w fell by 0.1 on steps 1, 2, 4, 6 only
    np.testing.assert_allclose(history, [0.9, 0.8, 0.8, 0.7, 0.7, 0.6], rtol=1e-6)
    with pytest.raises(FloatingPointError, match="step 3"):
        guard.raise_if_nonfinite(state)
    guard.raise_if_nonfinite(_state())  # a clean state passes


def test_guard_all_finite():
    assert bool(guard.all_finite({"a": jnp.ones(3), "i": jnp.arange(3)}))
    assert not bool(guard.all_finite({"a": jnp.array([1.0, jnp.inf])}))
    assert bool(guard.all_finite({"i": jnp.arange(3)}))  # no float leaves


def test_metrics_writer_lines_and_resume_truncation(tmp_path):
    with metrics.MetricsWriter(tmp_path, total_steps=4, desc="t") as writer:
        for step in (1, 2, 3, 4):
            writer.write(step, {"loss": jnp.float32(step / 2), "count": np.int64(step),
                                "nested": {"a": jnp.ones(())}})
    with open(tmp_path / "metrics.jsonl", "a") as stream:
        stream.write('{"step": 5, "lo')  # a line torn by a kill
    records = metrics.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[2]["loss"] == 1.5 and records[2]["count"] == 3
    assert records[2]["nested"] == {"a": 1.0}
    assert all(r["steps_per_s"] > 0 for r in records)
    # resuming after step 2 drops the later lines; a fresh run (step 0) starts an empty file
    with metrics.MetricsWriter(tmp_path, total_steps=4, initial_step=2) as writer:
        writer.write(3, {"loss": 9.0})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert json.loads(lines[-1])["loss"] == 9.0
    metrics.MetricsWriter(tmp_path, total_steps=4).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_sharding_single_device():
    mesh = sharding.make_mesh()
    batch = {"x": np.arange(8.0).reshape(4, 2), "y": np.arange(4)}
    if 4 % mesh.size == 0:
        sharded = sharding.shard_batch(batch, mesh)
        np.testing.assert_array_equal(sharded["x"], batch["x"])
    with pytest.raises(ValueError, match="common leading"):
        sharding.shard_batch({"x": np.zeros((4, 2)), "y": np.zeros(3)}, mesh)
    assert sharding.host_batch_size(4 * mesh.size, mesh) == 4 * mesh.size


def test_sharding_on_8_cpu_devices(run_with_cpu_devices):
    output = run_with_cpu_devices("""
        import jax, jax.numpy as jnp, numpy as np
        from recon.training import sharding
        mesh = sharding.make_mesh()
        assert mesh.size == 8 and mesh.axis_names == ("data",)
        batch = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
        sharded = sharding.shard_batch(batch, mesh)
        x = sharded["x"]
        assert x.sharding == sharding.data_sharding(mesh)
        assert len(x.addressable_shards) == 8
        assert all(s.data.shape == (2, 3) for s in x.addressable_shards)
        np.testing.assert_array_equal(np.asarray(x), batch["x"])
        w = sharding.replicate(jnp.ones(3), mesh)
        assert all(s.data.shape == (3,) for s in w.addressable_shards)
        step = jax.jit(lambda w, x: (x @ w).sum(), in_shardings=(sharding.replicated(mesh),
                       sharding.data_sharding(mesh)))
        assert float(step(w, x)) == float(batch["x"].sum())
        try:
            sharding.shard_batch({"x": np.zeros((12, 3))}, mesh)
        except ValueError as error:
            assert "does not divide over 8 devices" in str(error), error
        else:
            raise AssertionError("12 examples over 8 devices must fail")
        try:
            sharding.host_batch_size(12, mesh)
        except ValueError as error:
            print("OK", error)
        """)
    assert "OK global batch size 12 does not divide over the 8 devices" in output
