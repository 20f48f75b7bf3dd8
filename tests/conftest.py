"""Shared fixtures.

  shared_dir:           the licensed-data folder `../shared/flame2023_open` (or
                        $FACERECON_SHARED_DIR); skips, naming what is missing, when absent.
  flame_topology:       the shipped real FLAME arrays {"v_template" (5023, 3) float32 metres,
                        "shapedirs_id60" (5023, 3, 60) float32, "faces" (9976, 3) int32}
                        (session scope; read-only numpy arrays: copy before writing).
  landmark_embedding:   the shipped RingNet embedding {static_lmk_faces (51,), static_lmk_bary
                        (51, 3), dynamic_lmk_faces (79, 17), dynamic_lmk_bary (79, 17, 3)}.
  synthetic_model:      `flame_jax.synthetic()` with its defaults, built once per session.
  run_with_cpu_devices: run Python code in a subprocess that sees N fake CPU devices.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# One persistent XLA compilation cache for the whole test session, inherited by the subprocesses
# (kill-and-resume, CLI and 8-device tests), so a program compiled once is not compiled again.
# A fresh folder per session: nothing from an earlier run is reused.
_SESSION_COMPILATION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _SESSION_COMPILATION_CACHE = tempfile.mkdtemp(prefix="facerecon_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_COMPILATION_CACHE


def pytest_sessionfinish(session, exitstatus):
    if _SESSION_COMPILATION_CACHE is not None:
        shutil.rmtree(_SESSION_COMPILATION_CACHE, ignore_errors=True)


def find_shared_flame_dir():
    env = os.environ.get("FACERECON_SHARED_DIR")
    candidates = [pathlib.Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared" / "flame2023_open")
    for candidate in candidates:
        if (candidate / "FLAME_masks.pkl").exists():
            return candidate
    return None


@pytest.fixture(scope="session")
def shared_dir():
    found = find_shared_flame_dir()
    if found is None:
        pytest.skip("../shared/flame2023_open (or $FACERECON_SHARED_DIR) with FLAME_masks.pkl is "
                    "not present; these tests need the auxiliary FLAME files")
    return found


def _read_only(arrays):
    for value in arrays.values():
        value.setflags(write=False)  # shared by every test of the session
    return arrays


@pytest.fixture(scope="session")
def flame_topology():
    from flame_jax.shipped import load_topology

    return _read_only(load_topology())


@pytest.fixture(scope="session")
def landmark_embedding():
    from flame_jax.shipped import load_landmark_embedding

    return _read_only(load_landmark_embedding())


@pytest.fixture(scope="session")
def synthetic_model():
    import flame_jax

    return flame_jax.synthetic()


def _run_with_cpu_devices(code: str, num_devices: int = 8, timeout: float = 120.0) -> str:
    """Run `code` with `python -c` in a fresh process whose JAX sees `num_devices` CPU devices.

    XLA reads --xla_force_host_platform_device_count when the backend starts, so it cannot be
    changed inside the test process (whose JAX is usually initialised already). The child runs
    in the repository root with the same interpreter; the test fails with the child's stderr
    when it exits non-zero or runs past `timeout` seconds. Returns the child's stdout.
    """
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={num_devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in
                                        env.get("PYTHONPATH", "").split(os.pathsep) if p])
    try:
        result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT,
                                env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"subprocess with {num_devices} CPU devices ran past {timeout} s; "
                    f"stderr:\n{exc.stderr}")
    if result.returncode != 0:
        pytest.fail(f"subprocess with {num_devices} CPU devices exited with "
                    f"{result.returncode}; stderr:\n{result.stderr}")
    return result.stdout


@pytest.fixture(scope="session")
def run_with_cpu_devices():
    """`run_with_cpu_devices(code, num_devices=8, timeout=120.0) -> stdout` (see above)."""
    return _run_with_cpu_devices

