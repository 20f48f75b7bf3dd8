"""Two processes (`jax.distributed` on CPU, gloo collectives): a run SIGKILLed after its first
checkpoint resumes, each process restoring its own data-iterator shard through grain's orbax
handler, and ends where an uninterrupted two-process run ends."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

CHILD = """
import os, signal, sys, time
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
import tests.test_trainer as t
from recon.data import sources
from recon.training.regressor import loop

workdir, kill_at, cache = sys.argv[3], int(sys.argv[4]), sys.argv[5]
config = t.cheap_config(cache, steps=4, checkpoint_every=2, log_every=1)
if kill_at:
    make_loader = sources.make_train_loader

    class Killed:
        def __init__(self, iterator):
            self.iterator, self.count = iterator, 0

        def __next__(self):
            self.count += 1
            if self.count == kill_at:
                time.sleep(3.0)  # the step-2 checkpoint is saved asynchronously
                os.kill(os.getpid(), signal.SIGKILL)
            return next(self.iterator)

        def get_state(self):
            return self.iterator.get_state()

        def set_state(self, state):
            self.iterator.set_state(state)

    sources.make_train_loader = lambda *a, **k: Killed(make_loader(*a, **k))
loop.train_and_evaluate(config, workdir)
print("done", jax.process_index(), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_pair(workdir, kill_at: int, cache: str) -> list:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env["XLA_FLAGS"] = " ".join(flag for flag in env.get("XLA_FLAGS", "").split()
                                if "device_count" not in flag)
    address = f"127.0.0.1:{_free_port()}"
    processes = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHILD), address,
                                   str(index), str(workdir), str(kill_at), cache],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for index in range(2)]
    results = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            pytest.fail("a two-process run did not finish in 600 s")
        results.append((process.returncode, out, err))
    return results


def _metrics(workdir) -> list:
    return [json.loads(line) for line in
            (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_two_process_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
    cache = str(tmp_path / "cache")
    whole = tmp_path / "whole"
    for code, out, err in _run_pair(whole, 0, cache):
        assert code == 0, err[-3000:]
    resumed = tmp_path / "resumed"
    killed = _run_pair(resumed, 4, cache)
    assert all(code == -9 for code, _, _ in killed), [c for c, _, _ in killed]
    steps = sorted(p.name for p in (resumed / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == ["2"], steps
    # One iterator file per process in the checkpoint's data item.
    files = sorted(p.name for p in (resumed / "checkpoints" / "2" / "data").iterdir()
                   if p.name.startswith("process_"))
    assert files == ["process_0-of-2.json", "process_1-of-2.json"], files
    results = _run_pair(resumed, 0, cache)
    for code, out, err in results:
        assert code == 0, err[-3000:]
    assert "resuming from" in results[0][1], results[0][1][-2000:]  # process 0 logs
    a, b = _metrics(whole), _metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("loss", "vertex_mm", "landmark_ndc"):
        np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=1e-5,
                                   err_msg=key)
    final = json.loads((resumed / "evaluation.json").read_text())
    expected = json.loads((whole / "evaluation.json").read_text())
    for summary in (final, expected):
        summary.pop("wall_time_s")
    assert final == pytest.approx(expected, rel=1e-5)
