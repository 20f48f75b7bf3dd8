"""flame_jax.safe_pickle: the restricted unpickler is the security boundary of every pickle.

Hostile pickles carry live payloads (checked under plain `pickle` first) that would create a
sentinel file; the restricted unpickler must refuse them without the file ever appearing.
"""

import builtins
import io
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse
from pickle_writers import fake_chumpy, write_py2_pickle  # noqa: F401 (fake_chumpy: fixture)

from flame_jax import FlameFileError
from flame_jax.safe_pickle import (DEFAULT_ALLOWED_GLOBALS, chumpy_to_numpy, load_npy,
                                   load_pickle_file, restricted_unpickle)


class Evil:
    """Pickles to a call of `how` that creates `sentinel` when unpickled by plain pickle."""

    def __init__(self, how, sentinel):
        self.how, self.sentinel = how, str(sentinel)

    def __reduce__(self):
        touch = f"open({self.sentinel!r}, 'w').close()"
        if self.how == "os.system":
            return os.system, (f"touch {self.sentinel}",)
        if self.how == "builtins.eval":
            return builtins.eval, (touch,)
        if self.how == "builtins.exec":
            return builtins.exec, (touch,)
        if self.how == "subprocess.Popen":
            return subprocess.Popen, ([sys.executable, "-c", touch],)
        raise ValueError(self.how)


HOW = ["os.system", "builtins.eval", "builtins.exec", "subprocess.Popen"]


@pytest.mark.parametrize("how", HOW)
def test_malicious_globals_are_refused_without_running(tmp_path, how):
    control = tmp_path / "control"
    result = pickle.loads(pickle.dumps(Evil(how, control)))  # the payload is live
    if isinstance(result, subprocess.Popen):
        result.wait(timeout=60)
    assert control.exists()

    sentinel = tmp_path / "SENTINEL"
    module, name = how.split(".")
    module = "(posix|nt)" if module == "os" else module  # os.system pickles as posix.system
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        blob = pickle.dumps({"v_template": [Evil(how, sentinel)]}, protocol=protocol)
        pattern = rf"evil\.pkl: pickle refers to the forbidden global {module}\.{name}"
        with pytest.raises(FlameFileError, match=pattern):
            restricted_unpickle(blob, source="evil.pkl")
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(Evil(how, sentinel), protocol=2))
    with pytest.raises(FlameFileError, match=rf"evil\.pkl.*forbidden global {module}\.{name}"):
        load_pickle_file(path)
    assert not sentinel.exists()


def test_python2_names_of_forbidden_globals_are_refused(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    # Python-2 spelling `__builtin__.eval` is mapped to `builtins.eval` and refused.
    blob = f"c__builtin__\neval\n(V{'open(' + repr(str(sentinel)) + ', chr(119))'}\ntR.".encode()
    with pytest.raises(FlameFileError, match=r"forbidden global builtins\.eval"):
        restricted_unpickle(blob)
    assert not sentinel.exists()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_allowed_content_every_protocol(protocol):
    regressor = scipy.sparse.random(5, 40, density=0.2, random_state=0, format="csc")
    payload = {"float64": np.arange(12.0).reshape(3, 4), "int32": np.arange(5, dtype=np.int32),
               "fortran": np.asfortranarray(np.ones((2, 3), np.float32)),
               "scalar": np.float64(2.5), "bytes": b"\x00\xff", "text": "naïve",
               "set": {1, 2}, "nested": [(1, 2.0), {"a": None}], "J": regressor}
    out = restricted_unpickle(pickle.dumps(payload, protocol=protocol))
    for key in ("float64", "int32", "fortran"):
        np.testing.assert_array_equal(out[key], payload[key])
        assert out[key].dtype == payload[key].dtype
    assert out["scalar"] == 2.5 and out["bytes"] == b"\x00\xff" and out["text"] == "naïve"
    assert out["set"] == {1, 2} and out["nested"] == [(1, 2.0), {"a": None}]
    rebuilt = chumpy_to_numpy(out["J"])  # an inert stand-in until rebuilt from its arrays
    np.testing.assert_array_equal(rebuilt.toarray(), regressor.toarray())


@pytest.mark.parametrize("protocol", [0, 1, 2])
def test_python2_pickles(tmp_path, protocol):
    payload = {"lmk_face_idx": np.arange(51, dtype=np.uint32),
               "lmk_b_coords": np.full((51, 3), 1 / 3), "name": "static"}
    path = tmp_path / "py2.pkl"
    write_py2_pickle(payload, path, protocol=protocol)
    if protocol == 2:
        with pytest.raises(UnicodeDecodeError):  # really Python-2 strings: needs latin1
            pickle.loads(path.read_bytes())
    out = load_pickle_file(path)
    np.testing.assert_array_equal(out["lmk_face_idx"], payload["lmk_face_idx"])
    np.testing.assert_array_equal(out["lmk_b_coords"], payload["lmk_b_coords"])


def test_chumpy_state_protocol0_and_select(fake_chumpy):
    ch, select, dot = fake_chumpy
    base = np.arange(12.0).reshape(3, 4)
    payload = {"a": ch(base), "s": select(a=ch(base), idxs=np.array([5, 0, 11, 2]),
                                          preferred_shape=(2, 2)),
               "d": dot(a=ch(base), b=ch(base.T))}
    blobs = [pickle.dumps(payload, protocol=0), pickle.dumps(payload, protocol=2)]
    assert b"copy_reg\n_reconstructor" in blobs[0]
    for name in ("chumpy", "chumpy.ch", "chumpy.ch_ops", "chumpy.reordering"):
        sys.modules.pop(name)
    for blob in blobs:
        out = restricted_unpickle(blob, source="x.pkl")
        np.testing.assert_array_equal(chumpy_to_numpy(out["a"]), base)
        np.testing.assert_array_equal(chumpy_to_numpy(out["s"]),
                                      base.ravel()[[5, 0, 11, 2]].reshape(2, 2))
        with pytest.raises(FlameFileError, match=r"x\.pkl.*'J'.*chumpy\.ch_ops\.dot"):
            chumpy_to_numpy(out["d"], what="key 'J'", source="x.pkl")


def test_allow_list_is_enforced():
    blob = pickle.dumps({"a": np.arange(3)}, protocol=2)
    np.testing.assert_array_equal(restricted_unpickle(blob)["a"], np.arange(3))
    with pytest.raises(FlameFileError, match=r"now\.npy.*forbidden global.*_reconstruct"):
        restricted_unpickle(blob, allowed={}, source="now.npy")
    with pytest.raises(FlameFileError, match="forbidden global chumpy.ch.Ch"):
        restricted_unpickle(b"\x80\x02cchumpy.ch\nCh\nq\x00.", allow_chumpy=False)
    # copy_reg._reconstructor is only honoured for the inert stand-ins.
    crafted = b"ccopy_reg\n_reconstructor\n(c__builtin__\nset\nc__builtin__\nobject\nNtR."
    with pytest.raises(FlameFileError, match="_reconstructor"):
        restricted_unpickle(crafted)
    with pytest.raises(FlameFileError, match="encoding"):
        restricted_unpickle(b"c_codecs\nencode\n(Vabc\nVrot13\ntR.")
    with pytest.raises(FlameFileError, match=r"forbidden global torch\._utils.*torch tensors"):
        restricted_unpickle(b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00.")
    assert ("os", "system") not in DEFAULT_ALLOWED_GLOBALS


class _PersistentPickler(pickle.Pickler):
    """Writes every numpy array as a persistent id ('storage', key), like torch's zip format."""

    def __init__(self, file, storages):
        super().__init__(file, protocol=2)
        self.storages = storages

    def persistent_id(self, obj):
        if isinstance(obj, np.ndarray):
            key = str(len(self.storages))
            self.storages[key] = obj
            return ("storage", key)
        return None


def test_persistent_ids_refused_by_default_and_routed_when_given():
    storages = {}
    buffer = io.BytesIO()
    _PersistentPickler(buffer, storages).dump({"weight": np.arange(6.0), "step": 3})
    blob = buffer.getvalue()
    with pytest.raises(FlameFileError, match=r"ckpt\.pkl.*persistent ids.*'storage', '0'"):
        restricted_unpickle(blob, source="ckpt.pkl")
    seen = []

    def resolve(pid):
        seen.append(pid)
        kind, key = pid
        return storages[key] * 2  # the callable decides what the id stands for

    out = restricted_unpickle(blob, persistent_load=resolve)
    assert seen == [("storage", "0")] and out["step"] == 3
    np.testing.assert_array_equal(out["weight"], np.arange(6.0) * 2)
    # Globals inside a persistent-id pickle are still checked.
    evil = io.BytesIO()
    _PersistentPickler(evil, {}).dump([os.getcwd, np.zeros(1)])
    with pytest.raises(FlameFileError, match=r"forbidden global (posix|nt)\.getcwd"):
        restricted_unpickle(evil.getvalue(), persistent_load=resolve)


def test_truncated_and_corrupt_input(tmp_path):
    blob = pickle.dumps({"a": np.arange(100.0), "b": "x" * 50}, protocol=2)
    for cut in (1, len(blob) // 3, len(blob) - 1):
        with pytest.raises(FlameFileError, match=r"cut\.pkl: truncated or corrupt pickle"):
            restricted_unpickle(blob[:cut], source="cut.pkl")
    with pytest.raises(FlameFileError, match="truncated or corrupt"):
        restricted_unpickle(b"\x80\x02\xff garbage")
    (tmp_path / "empty.pkl").write_bytes(b"")
    with pytest.raises(FlameFileError, match=r"empty\.pkl: file is empty"):
        load_pickle_file(tmp_path / "empty.pkl")
    (tmp_path / "image.pkl").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(FlameFileError, match=r"image\.pkl.*looks like a PNG image"):
        load_pickle_file(tmp_path / "image.pkl")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pkl: no such file"):
        load_pickle_file(tmp_path / "nowhere.pkl")


def test_load_npy_object_and_plain_arrays(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    np.save(tmp_path / "dict.npy", np.array({"k": np.arange(3)}, dtype=object),
            allow_pickle=True)
    np.testing.assert_array_equal(load_npy(tmp_path / "dict.npy")["k"], np.arange(3))
    np.save(tmp_path / "plain.npy", np.eye(3, dtype=np.float32))
    np.testing.assert_array_equal(load_npy(tmp_path / "plain.npy"), np.eye(3))
    np.save(tmp_path / "evil.npy", np.array([Evil("os.system", sentinel)], dtype=object),
            allow_pickle=True)
    with pytest.raises(FlameFileError, match=r"evil\.npy.*forbidden global (posix|nt)\.system"):
        load_npy(tmp_path / "evil.npy")
    blob = (tmp_path / "dict.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(blob[: len(blob) - 10])
    with pytest.raises(FlameFileError, match=r"cut\.npy.*truncated or corrupt"):
        load_npy(tmp_path / "cut.npy")
    (tmp_path / "bad.npy").write_bytes(b"not an npy")
    with pytest.raises(FlameFileError, match=r"bad\.npy: not a valid \.npy"):
        load_npy(tmp_path / "bad.npy")
    assert not sentinel.exists()
