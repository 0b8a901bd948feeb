"""Loading federated data from .npz and LEAF JSON files written to tmp_path."""

import json

import numpy as np
import pytest

from fedjax_sim._validation import ConfigError
from fedjax_sim.data.federated import federated_data_from_clients
from fedjax_sim.data.io import load_leaf, load_leaf_split, load_npz, save_npz


def ragged_clients(seed=0, sizes=(3, 1, 5), shape=(2, 2)):
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(n,) + shape).astype(np.float32) for n in sizes]
    ys = [rng.integers(0, 4, size=n) for n in sizes]
    return xs, ys


def assert_clients_equal(data, xs, ys):
    assert data.num_clients == len(xs)
    x, y, counts = np.asarray(data.x), np.asarray(data.y), np.asarray(data.counts)
    for k, (xk, yk) in enumerate(zip(xs, ys)):
        assert counts[k] == len(yk)
        np.testing.assert_array_equal(x[k, :len(yk)], xk)
        np.testing.assert_array_equal(y[k, :len(yk)], yk)


def write_leaf(path, users):
    blob = {"users": list(users), "num_samples": [len(v[1]) for v in users.values()],
            "user_data": {u: {"x": np.asarray(x).tolist(), "y": np.asarray(y).tolist()}
                          for u, (x, y) in users.items()}}
    path.write_text(json.dumps(blob))


# ----------------------------------------------------------------------------- npz


def test_npz_padded_round_trip(tmp_path):
    xs, ys = ragged_clients()
    data = federated_data_from_clients(xs, ys, num_classes=7)
    save_npz(tmp_path / "fed.npz", data, client_names=["a", "b", "c"])
    loaded = load_npz(tmp_path / "fed.npz")
    assert loaded.client_names == ["a", "b", "c"]
    assert loaded.data.num_classes == 7
    assert_clients_equal(loaded.data, xs, ys)
    unnamed = tmp_path / "unnamed.npz"
    save_npz(unnamed, data)
    assert load_npz(unnamed).client_names == ["0", "1", "2"]


def test_npz_flat_layout_groups_by_client(tmp_path):
    xs, ys = ragged_clients()
    ids = np.concatenate([np.full(len(y), cid) for cid, y in zip([30, 10, 20], ys)])
    order = np.random.default_rng(1).permutation(len(ids))  # interleave the clients
    x_file, y_file, id_file = np.concatenate(xs)[order], np.concatenate(ys)[order], ids[order]
    np.savez(tmp_path / "flat.npz", x=x_file, y=y_file, client_ids=id_file)
    loaded = load_npz(tmp_path / "flat.npz", max_examples=8)
    assert loaded.client_names == ["10", "20", "30"]
    assert loaded.data.max_examples == 8
    # Clients in sorted id order, each keeping the file order of its examples.
    expected_x = [x_file[id_file == cid] for cid in (10, 20, 30)]
    expected_y = [y_file[id_file == cid] for cid in (10, 20, 30)]
    assert_clients_equal(loaded.data, expected_x, expected_y)
    np.savez(tmp_path / "named.npz", x=x_file, y=y_file,
             client_ids=np.array(["c", "a", "b"])[np.searchsorted([10, 20, 30], id_file)])
    assert load_npz(tmp_path / "named.npz").client_names == ["a", "b", "c"]


def test_npz_errors_name_the_key(tmp_path):
    np.savez(tmp_path / "no_y.npz", x=np.zeros((2, 3, 1), np.float32), counts=[1, 2])
    with pytest.raises(ConfigError, match="'y'|y"):
        load_npz(tmp_path / "no_y.npz")
    np.savez(tmp_path / "both.npz", x=np.zeros((2, 3, 1)), y=np.zeros((2, 3), int),
             counts=[1, 2], client_ids=[0, 1])
    with pytest.raises(ConfigError, match="counts"):
        load_npz(tmp_path / "both.npz")
    np.savez(tmp_path / "bad_counts.npz", x=np.zeros((2, 3, 1)), y=np.zeros((2, 3), int),
             counts=[1, 9])
    with pytest.raises(ConfigError, match="counts"):
        load_npz(tmp_path / "bad_counts.npz")
    np.savez(tmp_path / "bad_ids.npz", x=np.zeros((4, 1)), y=np.zeros(4, int),
             client_ids=[0, 1])
    with pytest.raises(ConfigError, match="client_ids"):
        load_npz(tmp_path / "bad_ids.npz")
    with pytest.raises(ConfigError, match="path"):
        load_npz(tmp_path / "missing.npz")


# ---------------------------------------------------------------------------- LEAF


def test_leaf_file_and_directory(tmp_path):
    xs, ys = ragged_clients(shape=(4,))
    write_leaf(tmp_path / "one.json", {"f_1": (xs[0], ys[0]), "f_0": (xs[1], ys[1])})
    loaded = load_leaf(tmp_path / "one.json", num_classes=5)
    assert loaded.client_names == ["f_1", "f_0"]
    assert loaded.data.num_classes == 5
    assert_clients_equal(loaded.data, xs[:2], ys[:2])
    write_leaf(tmp_path / "two.json", {"f_2": (xs[2], ys[2])})
    merged = load_leaf(tmp_path)
    assert merged.client_names == ["f_1", "f_0", "f_2"]
    assert_clients_equal(merged.data, xs, ys)
    shaped = load_leaf(tmp_path / "one.json", example_shape=(2, 2, 1))
    assert shaped.data.example_shape == (2, 2, 1)
    np.testing.assert_array_equal(np.asarray(shaped.data.x)[0, :3], xs[0].reshape(3, 2, 2, 1))


def test_leaf_float_labels_that_are_integers_are_accepted(tmp_path):
    # The FedProx generators write labels as floats (3.0).
    write_leaf(tmp_path / "f.json", {"u": ([[0.5], [1.5]], [3.0, 1.0])})
    data = load_leaf(tmp_path / "f.json").data
    np.testing.assert_array_equal(np.asarray(data.y)[0], [3, 1])
    assert data.num_classes == 4


def test_leaf_train_test_split(tmp_path):
    xs, ys = ragged_clients(shape=(3,))
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    write_leaf(tmp_path / "train" / "a.json", {"u0": (xs[0], ys[0]), "u1": (xs[1], ys[1])})
    write_leaf(tmp_path / "test" / "a.json", {"u1": (xs[2], ys[2] + 5)})
    split = load_leaf_split(tmp_path)
    assert split.client_names == ["u0", "u1"]
    assert split.train.num_classes == split.test.num_classes == int((ys[2] + 5).max()) + 1
    np.testing.assert_array_equal(np.asarray(split.test.counts), [0, len(ys[2])])
    assert_clients_equal(split.train, xs[:2], ys[:2])
    write_leaf(tmp_path / "test" / "b.json", {"stranger": (xs[0], ys[0])})
    with pytest.raises(ConfigError, match="stranger"):
        load_leaf_split(tmp_path)


@pytest.mark.parametrize("blob, match", [
    ({"user_data": {}}, "users"),
    ({"users": ["a"], "user_data": {}}, "'a'"),
    ({"users": ["a"], "user_data": {"a": {"x": [[1.0]]}}}, "'x' and 'y'"),
    ({"users": ["a"], "user_data": {"a": {"x": [[1.0], [1.0, 2.0]], "y": [0, 1]}}},
     r"\['a'\]\.x"),
    ({"users": ["a"], "user_data": {"a": {"x": [["hello"]], "y": [0]}}}, r"\['a'\]\.x"),
    ({"users": ["a"], "user_data": {"a": {"x": [[1.0]], "y": [0.5]}}}, r"\['a'\]\.y"),
    ({"users": ["a"], "user_data": {"a": {"x": [[1.0]], "y": [0, 1]}}}, r"\['a'\]\.y"),
    ({"users": ["a"], "user_data": {"a": {"x": [[1.0]], "y": [-1]}}}, r"\['a'\]\.y"),
    ({"users": ["a"], "num_samples": [2], "user_data": {"a": {"x": [[1.0]], "y": [0]}}},
     "num_samples"),
    ({"users": ["a", "a"], "user_data": {"a": {"x": [[1.0]], "y": [0]}}}, "twice"),
    ([1, 2], "JSON object"),
])
def test_leaf_malformed_files_name_the_field(tmp_path, blob, match):
    (tmp_path / "bad.json").write_text(json.dumps(blob))
    with pytest.raises(ConfigError, match=match):
        load_leaf(tmp_path / "bad.json")


def test_leaf_directory_errors(tmp_path):
    write_leaf(tmp_path / "a.json", {"u": ([[1.0]], [0])})
    write_leaf(tmp_path / "b.json", {"u": ([[2.0]], [1])})
    with pytest.raises(ConfigError, match="already appears"):
        load_leaf(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .json"):
        load_leaf(tmp_path / "empty")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="valid JSON"):
        load_leaf(tmp_path / "broken.json")
    with pytest.raises(ConfigError, match="example_shape"):
        load_leaf(tmp_path / "a.json", example_shape=(2, 2))
