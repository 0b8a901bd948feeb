"""scripts/poisoning_sweep.py end to end at tiny sizes: table, agreement, plot, an outcome."""

import csv
import importlib.util
import itertools
import json
import math
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "poisoning_sweep.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load_script():
    spec = importlib.util.spec_from_file_location("poisoning_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _csv_value(field, text):
    """A CSV cell back to the JSON value (empty cell = null)."""
    if text == "":
        return None
    if field in ("defence", "attack"):
        return text
    if field == "num_malicious":
        return int(text)
    return float(text)


@pytest.mark.slow
def test_sweep_writes_one_row_per_cell_and_the_mean_takes_the_backdoor(tmp_path):
    script = _load_script()
    fractions, attacks, defences = [0.0, 0.05], ["model_replacement", "sign_flip"], \
        ["mean", "median"]
    # 20 digit clients, all sampled every round: fraction 0.05 is 1 attacker per round.
    assert script.main(["--output", str(tmp_path), "--num-clients", "20", "--rounds", "3",
                        "--local-epochs", "3", "--seed", "0",
                        "--fractions", *map(str, fractions), "--attacks", *attacks,
                        "--defences", *defences]) == 0

    with open(tmp_path / "poisoning_sweep.json") as f:
        doc = json.load(f)
    rows = doc["rows"]
    with open(tmp_path / "poisoning_sweep.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == script.FIELDS
        table = list(reader)

    # Exactly one row per requested (defence, attack, fraction), in JSON and CSV alike.
    cells = [(r["defence"], r["attack"], r["fraction"]) for r in rows]
    assert sorted(cells) == sorted(itertools.product(defences, attacks, fractions))
    assert len(table) == len(rows)
    for row, line in zip(rows, table):
        assert set(line) == set(row)
        for field, value in row.items():
            got = _csv_value(field, line[field])
            if isinstance(value, float):
                assert math.isclose(got, value, rel_tol=1e-12), (field, line, row)
            else:
                assert got == value, (field, line, row)

    # Values in range; who is malicious and what is measured follow the cell.
    for r in rows:
        assert 0.0 <= r["test_accuracy"] <= 1.0, r
        assert r["num_malicious"] == round(r["fraction"] * 20), r
        backdoor = r["attack"] == "model_replacement" and r["fraction"] > 0
        if backdoor:
            assert 0.0 <= r["backdoor_success"] <= 1.0, r
        else:
            assert r["backdoor_success"] is None, r
    assert doc["meta"]["base_config"]["num_clients"] == 20
    assert doc["meta"]["jax_version"]

    by = {(r["defence"], r["attack"], r["fraction"]): r for r in rows}
    # The honest baseline is one run per defence, repeated under every attack.
    for d in defences:
        assert by[d, attacks[0], 0.0] == dict(by[d, attacks[1], 0.0], attack=attacks[0])
        # Trained at all: far above chance (0.1) without attackers.
        assert by[d, attacks[0], 0.0]["test_accuracy"] > 0.6, by[d, attacks[0], 0.0]

    # One boosted attacker per round owns the mean but not the coordinate median.
    # Seeds 0-5 measured (staged attacks): mean 0.82-1.00, median 0.00-0.01. With 2
    # rounds of 2 epochs the attacker's model sometimes had not learnt the trigger yet
    # (seed 0: 0.03), so the test trains 3 rounds of 3 epochs.
    mean = by["mean", "model_replacement", 0.05]
    median = by["median", "model_replacement", 0.05]
    assert mean["backdoor_success"] >= median["backdoor_success"] + 0.4, (mean, median)
    # ... and the median keeps its honest accuracy (seeds 0-4: within 0.015).
    assert median["test_accuracy"] >= by["median", "model_replacement", 0.0][
        "test_accuracy"] - 0.1, (median, by["median", "model_replacement", 0.0])

    # One valid PNG, one panel per attack.
    png = tmp_path / "poisoning_sweep.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image
    image = matplotlib.image.imread(png)
    height, width = image.shape[:2]
    assert height > 100 and width > height  # 2 panels side by side: wider than tall


def test_sweep_rejects_fractions_outside_the_unit_interval(tmp_path, capsys):
    script = _load_script()
    with pytest.raises(SystemExit) as exc:
        script.main(["--output", str(tmp_path), "--fractions", "0", "1.5"])
    assert exc.value.code == 2
    assert "--fractions" in capsys.readouterr().err
    assert not (tmp_path / "poisoning_sweep.csv").exists()
