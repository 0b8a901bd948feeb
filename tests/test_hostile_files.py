"""Hostile user files given to ``fedjax-sim run --data npz|leaf`` are refused in one line.

Each case writes a small bad file and runs the command line in-process: exit status 2,
exactly one stderr line that names the field (``data_path``/``test_path``) and the
offending key or value, and nothing loaded by pickle or allocated at a declared size.
"""

import io
import json
import os
import re
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest

from fedjax_sim._validation import ConfigError
from fedjax_sim.data.io import MAX_NUM_CLASSES, load_leaf, load_npz
from fedjax_sim.experiment.cli import main

TINY = ["--num-clients", "2", "--cohort-size", "2", "--rounds", "1", "--no-progress"]


def refused(capsys, source, path, *extra):
    """Runs the CLI on ``path``; returns its one stderr line (asserting exit status 2)."""
    capsys.readouterr()
    rc = main(["run", "--data", source, "--data-path", str(path), *TINY, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("fedjax-sim run: error: "), err
    return err[0]


def padded(**over):
    """A valid padded-layout dataset (2 clients, 2 classes), with keys replaced."""
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(2, 3, 2)).astype(np.float32),
              "y": np.array([[0, 1, 0], [1, 0, 1]]), "counts": np.array([3, 2])}
    arrays.update(over)
    return {k: v for k, v in arrays.items() if v is not None}


def write_npz(tmp_path, name="f.npz", **arrays):
    path = tmp_path / name
    with open(path, "wb") as f:  # np.savez appends ".npz" to a name without it
        np.savez(f, **arrays)
    return path


def header_only_npz(path, members):
    """An .npz whose members are .npy headers declaring ``{key: (descr, shape)}`` and
    no data (what a decompression bomb's headers look like)."""
    with zipfile.ZipFile(path, "w") as zf:
        for key, (descr, shape) in members.items():
            buf = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                buf, {"descr": descr, "fortran_order": False, "shape": shape})
            zf.writestr(f"{key}.npy", buf.getvalue())
    return path


# ----------------------------------------------------------------------------- npz


def test_a_valid_file_passes_every_check(tmp_path):
    loaded = load_npz(write_npz(tmp_path, **padded()))
    assert loaded.data.num_classes == 2 and loaded.data.num_examples == 5


@pytest.mark.parametrize("content, match", [
    (b"", "is empty"),
    (b"just some text, not a zip archive", "not a zip archive"),
    (b"\x80\x04\x95pickle-ish bytes", "not a zip archive"),
])
def test_files_that_are_not_npz(tmp_path, capsys, content, match):
    (tmp_path / "bad.npz").write_bytes(content)
    line = refused(capsys, "npz", tmp_path / "bad.npz")
    assert "data_path=" in line and match in line


def test_truncated_and_corrupted_archives(tmp_path, capsys):
    good = write_npz(tmp_path, **padded()).read_bytes()
    (tmp_path / "cut.npz").write_bytes(good[:len(good) // 2])
    assert "not a zip archive" in refused(capsys, "npz", tmp_path / "cut.npz")
    # Flip a byte of x's data: the archive's directory is intact, its checksum is not.
    at = good.index(b"\x93NUMPY") + 150  # x: 128 header bytes, then 48 of data
    (tmp_path / "crc.npz").write_bytes(good[:at] + bytes([good[at] ^ 0xFF]) + good[at + 1:])
    line = refused(capsys, "npz", tmp_path / "crc.npz")
    assert "data_path=" in line and "cannot be read as .npz" in line and "CRC" in line
    with zipfile.ZipFile(tmp_path / "junk.npz", "w") as zf:
        zf.writestr("x.npy", b"not an array")
    line = refused(capsys, "npz", tmp_path / "junk.npz")
    assert "x='<unreadable>': is not a .npy array" in line


@pytest.mark.parametrize("key, value", [
    ("x", np.array([[["a", "b"]] * 3] * 2)),
    ("x", np.zeros((2, 3, 2), np.complex64)),
    ("y", np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])),  # float labels, integral or not
    ("y", np.array([[0.5, 1.0, 0.0], [1.0, 0.0, 1.0]])),
    ("counts", np.array(["3", "2"])),
])
def test_wrong_dtypes_name_the_key(tmp_path, capsys, key, value):
    line = refused(capsys, "npz", write_npz(tmp_path, **padded(**{key: value})))
    assert f"{key}.dtype=" in line and "must be" in line


def test_object_arrays_are_never_unpickled(tmp_path, capsys, monkeypatch):
    path = tmp_path / "obj.npz"
    np.savez(path, **padded(x=np.array([{"evil": 1}, None], dtype=object)))
    monkeypatch.setattr("pickle.loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr("pickle.load", lambda *a, **k: pytest.fail("unpickled"))
    line = refused(capsys, "npz", path)
    assert "x.dtype='object'" in line and "never unpickled" in line


@pytest.mark.parametrize("over, match", [
    ({"y": None}, "key='y': is missing"),
    ({"counts": None}, "need exactly one of 'counts'"),
    ({"client_ids": np.arange(2)}, "need exactly one of 'counts'"),
    ({"y": np.zeros((2, 2), np.int64)}, "y.shape=(2, 2)"),
    ({"counts": np.array([[3, 2]])}, "counts.shape=(1, 2)"),
    ({"client_names": np.array(["a"])}, "client_names.shape=(1,)"),
    ({"num_classes": np.array([2, 3])}, "num_classes.shape=(2,)"),
    ({"x": np.zeros(6, np.float32), "y": np.zeros(6, np.int64)}, "x.shape=(6,)"),
    ({"x": np.zeros((2, 3, 0), np.float32)}, "no empty axis"),
    ({"counts": np.array([3, 4])}, "counts=4: must lie in [0, 3]"),
    ({"counts": np.array([-1, 2])}, "counts=-1"),
])
def test_missing_keys_and_wrong_shapes(tmp_path, capsys, over, match):
    line = refused(capsys, "npz", write_npz(tmp_path, **padded(**over)))
    assert "data_path=" in line and match in line


def test_flat_layout_lengths_must_agree(tmp_path, capsys):
    x = np.zeros((4, 2), np.float32)
    path = write_npz(tmp_path, x=x, y=np.array([0, 1, 0]), client_ids=np.arange(4) % 2)
    assert "y.shape=(3,): must be (4,)" in refused(capsys, "npz", path)
    path = write_npz(tmp_path, "ids.npz", x=x, y=np.array([0, 1, 0, 1]),
                     client_ids=np.array([0.0, 1.0, 0.0, 1.0]))
    assert "client_ids.dtype='float64'" in refused(capsys, "npz", path)


@pytest.mark.parametrize("y, num_classes, match", [
    ([[-1, 1, 0], [1, 0, 1]], None, "y=-1: labels must be >= 0"),
    ([[0, 5, 0], [1, 0, 1]], 3, "y=5: labels must be < num_classes=3"),
    ([[0, 2**30, 0], [1, 0, 1]], None, f"y={2**30}: labels must be < MAX_NUM_CLASSES"),
    ([[0, 2**62, 0], [1, 0, 1]], None, f"y={2**62}"),
])
def test_labels_out_of_range(tmp_path, capsys, y, num_classes, match):
    over = {"y": np.array(y, np.int64)}
    if num_classes is not None:
        over["num_classes"] = np.array(num_classes)
    assert match in refused(capsys, "npz", write_npz(tmp_path, **padded(**over)))


def test_label_beyond_the_padding_is_ignored(tmp_path):
    # Client 1 holds 2 real examples; its padding slot may hold anything.
    loaded = load_npz(write_npz(tmp_path, **padded(y=np.array([[0, 1, 0], [1, 0, -7]]))))
    assert np.asarray(loaded.data.y).min() == 0


def test_a_stored_num_classes_above_the_bound(tmp_path, capsys):
    path = write_npz(tmp_path, **padded(num_classes=np.array(2**40)))
    assert f"num_classes={2**40}: must be <= {MAX_NUM_CLASSES}" in refused(capsys, "npz",
                                                                            path)


@pytest.mark.parametrize("bad, shown", [(np.nan, "nan"), (np.inf, "inf"), (-np.inf, "-inf"),
                                        (1e300, "inf")])  # 1e300 overflows float32
def test_non_finite_features_name_the_example(tmp_path, capsys, bad, shown):
    x = np.zeros((2, 3, 2))
    x[1, 1, 0] = bad
    line = refused(capsys, "npz", write_npz(tmp_path, **padded(x=x)))
    assert f"x[1, 1]={shown}: inputs must be finite" in line


def test_paths_that_are_not_readable_files(tmp_path, capsys, monkeypatch):
    assert "no such file" in refused(capsys, "npz", tmp_path / "absent.npz")
    assert "is a directory" in refused(capsys, "npz", tmp_path)
    assert "cannot be read (File name too long)" in refused(capsys, "npz", "a" * 5000)
    path = write_npz(tmp_path, **padded())
    os.chmod(path, 0)
    if os.access(path, os.R_OK):  # root reads anything: stand in for the permission bit
        monkeypatch.setattr(os, "access", lambda p, mode: False)
    assert "cannot be read (permission denied)" in refused(capsys, "npz", path)
    monkeypatch.undo()
    os.mkfifo(tmp_path / "pipe.npz")  # opening a pipe would block forever
    assert "not a regular file" in refused(capsys, "npz", tmp_path / "pipe.npz")


def test_a_declared_size_is_refused_before_anything_is_read(tmp_path, capsys):
    path = header_only_npz(tmp_path / "bomb.npz", {
        "x": ("<f4", (2, 10**6, 10**7)), "y": ("<i8", (2, 10**6)), "counts": ("<i8", (2,))})
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as e:
            load_npz(path, field="data_path")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2**20
    need = int(re.search(r"\((\d+) bytes\)", str(e.value)).group(1))
    assert need >= 2 * 10**13 * 4  # x alone, as float32
    assert "data_path=" in str(e.value) and "over the" in str(e.value)
    assert "data_path=" in refused(capsys, "npz", path)


def test_test_path_must_match_the_training_data(tmp_path, capsys):
    train = write_npz(tmp_path, "train.npz", **padded())
    wide = write_npz(tmp_path, "wide.npz", **padded(x=np.zeros((2, 3, 5), np.float32)))
    line = refused(capsys, "npz", train, "--test-path", str(wide))
    assert "test_path=" in line and "shape (5,)" in line
    bad = write_npz(tmp_path, "bad.npz", **padded(y=np.array([[0, -3, 0], [0, 0, 0]])))
    assert "test_path=" in refused(capsys, "npz", train, "--test-path", str(bad))


def test_one_class_only(tmp_path, capsys):
    path = write_npz(tmp_path, **padded(y=np.zeros((2, 3), np.int64)))
    assert "one class only" in refused(capsys, "npz", path)


# ---------------------------------------------------------------------------- LEAF


GOOD = {"users": ["a", "b"], "num_samples": [2, 1],
        "user_data": {"a": {"x": [[1, 2], [3, 4]], "y": [0, 1]},
                      "b": {"x": [[5, 6]], "y": [1]}}}


def leaf(tmp_path, change=None, text=None, name="f.json"):
    blob = json.loads(json.dumps(GOOD))
    if change is not None:
        change(blob)
    path = tmp_path / name
    path.write_text(json.dumps(blob) if text is None else text)
    return path


def test_a_valid_leaf_file_loads(tmp_path):
    assert load_leaf(leaf(tmp_path)).data.num_examples == 3


@pytest.mark.parametrize("write, match", [
    (lambda p: p.write_bytes(b"\xff\xfe\x00\x81 binary"), "is not UTF-8 text"),
    (lambda p: p.write_text(json.dumps(GOOD)[:40]), "is not valid JSON (line 1"),
    (lambda p: p.write_text("[" * 100_000 + "]" * 100_000), "is not valid JSON"),
    (lambda p: p.write_text('{"users": ' + "9" * 5000 + "}"), "is not valid JSON"),
    (lambda p: p.write_text("[1, 2]"), "top level='list': must be a JSON object"),
])
def test_files_that_are_not_leaf_json(tmp_path, capsys, write, match):
    write(tmp_path / "f.json")
    line = refused(capsys, "leaf", tmp_path / "f.json")
    assert "data_path=" in line and match in line


def _set(user, key, value):
    return lambda blob: blob["user_data"][user].__setitem__(key, value)


@pytest.mark.parametrize("change, match", [
    (lambda b: b.pop("users"), "key='users': is missing"),
    (lambda b: b.pop("user_data"), "key='user_data': is missing"),
    (lambda b: b.__setitem__("users", "ab"), "users='<str>'"),
    (_set("a", "y", [0]), "user_data['a'].y='<1 labels>': must match x (2 examples)"),
    (_set("a", "x", [[1, 2], [3]]), "user_data['a'].x='<non-numeric or ragged>'"),
    (_set("a", "x", [[1, None], [3, 4]]), "user_data['a'].x='<non-numbers>'"),
    (_set("a", "x", [1, 2]), "user_data['a'].x.shape=(2,)"),
    (_set("a", "y", ["0", "1"]), "user_data['a'].y='<strings>'"),
    (_set("a", "y", [0.5, 1]), "user_data['a'].y=0.5: labels must be integers"),
    (_set("a", "y", [-1, 1]), "user_data['a'].y=-1: labels must be >= 0"),
    (_set("a", "y", [2**30, 1]), f"y={2**30}: labels must be < MAX_NUM_CLASSES"),
    (_set("a", "y", [2**80, 1]), "labels must be < MAX_NUM_CLASSES"),
    (_set("b", "x", [[5, 6, 7]]), "users must share one shape"),
    (lambda b: b.__setitem__("num_samples", [2, 9]), "num_samples[1]=9"),
])
def test_wrong_structure_names_the_user_and_key(tmp_path, capsys, change, match):
    line = refused(capsys, "leaf", leaf(tmp_path, change))
    assert "data_path=" in line and match in line


@pytest.mark.parametrize("literal, shown", [("NaN", "nan"), ("Infinity", "inf"),
                                            ("1e999", "inf"), ("1e39", "inf")])
def test_non_finite_leaf_features(tmp_path, capsys, literal, shown):
    path = leaf(tmp_path, text=json.dumps(GOOD).replace("[3, 4]", f"[3, {literal}]"))
    assert f"user_data['a'].x[1]={shown}: inputs must be finite" in refused(capsys, "leaf",
                                                                           path)
    path = leaf(tmp_path, text=json.dumps(GOOD).replace('"y": [1]', f'"y": [{literal}]'))
    assert "user_data['b'].y=" in refused(capsys, "leaf", path)


def test_leaf_directories(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "holds no .json files" in refused(capsys, "leaf", tmp_path / "empty")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "sub.json").mkdir()  # a folder named like a file is skipped
    leaf(tmp_path / "d", name="a.json")
    assert load_leaf(tmp_path / "d").data.num_clients == 2
    assert "no such file or directory" in refused(capsys, "leaf", tmp_path / "absent")


def test_a_large_json_file_is_refused_before_parsing(tmp_path, monkeypatch):
    path = leaf(tmp_path)
    monkeypatch.setattr("fedjax_sim._host.device_memory_bytes", lambda *a: 100)
    with pytest.raises(ConfigError, match=r"parsing this JSON file needs >= .*over the 100 B"):
        load_leaf(path, field="data_path")


def test_padding_is_refused_before_it_is_allocated(tmp_path, monkeypatch):
    # One client with 200,000 examples pads 200,001 clients to that size: 2.76 TB.
    n = 200_000
    path = tmp_path / "flat.npz"
    np.savez_compressed(path, x=np.zeros((2 * n, 16), np.int8), y=np.zeros(2 * n, np.int8),
                        client_ids=np.concatenate([np.zeros(n, np.int32),
                                                   np.arange(1, n + 1, dtype=np.int32)]))
    with pytest.raises(ConfigError, match=r"data_path=.*padding 200001 clients to 200000 "
                                          r"examples of shape \(16,\) needs >= 2.76 TB"):
        load_npz(path, field="data_path")
    # LEAF: the same rule, shown with a small device.
    users = {"big": {"x": [[0] * 10] * 50, "y": [0] * 50}}
    users.update({f"u{i}": {"x": [[0] * 10], "y": [1]} for i in range(19)})
    (tmp_path / "l.json").write_text(json.dumps({"users": list(users), "user_data": users}))
    assert 2 * (tmp_path / "l.json").stat().st_size < 20_000 < 20 * 50 * 45
    monkeypatch.setattr("fedjax_sim._host.device_memory_bytes", lambda *a: 20_000)
    with pytest.raises(ConfigError, match="padding 20 clients to 50 examples"):
        load_leaf(tmp_path / "l.json")


# ------------------------------------------------------------- whole command line


def test_the_console_script_prints_no_traceback(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, **padded(x=np.array([object()] * 2, dtype=object)))
    proc = subprocess.run([sys.executable, "-m", "fedjax_sim", "run", "--data", "npz",
                           "--data-path", str(path), *TINY], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"fedjax-sim run: error: data_path='{path}'")
