"""``fedjax-sim attack ...``: metrics JSON and PNG written, one-line errors."""

import json
import os

import pytest

from fedjax_sim.experiment.cli import main


def _run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("argv", [
    ["attack", "imprint", "--bins", "32", "--batch-size", "16", "--num-victims", "2"],
    ["attack", "inversion", "--attack", "closed_form", "--batch-size", "1",
     "--num-victims", "4"],
    ["attack", "malicious-client", "--bins", "64", "--cohort-size", "6", "--batch-size", "2",
     "--trials", "1"],
])
def test_subcommands_write_metrics_and_png(argv, tmp_path, capsys):
    rc, out, err = _run(argv + ["--output", str(tmp_path), "--seed", "1"], capsys)
    assert rc == 0, err
    line = json.loads(out.strip().splitlines()[-1])
    with open(tmp_path / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["attack"] == line["attack"]
    assert os.path.getsize(tmp_path / "reconstructions.png") > 1000
    if argv[1] == "imprint":
        assert metrics["predicted_rate"] == pytest.approx((1 - 1 / 32) ** 15)
    if argv[1] == "inversion":
        assert metrics["psnr"] > 30.0


def test_bad_values_print_one_line_and_exit_2(capsys):
    rc, out, err = _run(["attack", "imprint", "--bins", "1"], capsys)
    assert rc == 2 and out == ""
    assert err.strip().splitlines() == ["fedjax-sim attack: error: bins=1: must be >= 2"]
    rc, _, err = _run(["attack", "inversion", "--noise-multiplier", "0.5"], capsys)
    assert rc == 2 and "clip_norm=None" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exc:
        main(["attack"])
    assert exc.value.code == 2


def test_sweep_script_writes_csv_json_and_pngs(tmp_path, monkeypatch, capsys):
    """scripts/attack_sweep.py end to end, with the (minutes-long) sweep replaced by rows."""
    import csv
    import importlib.util
    import pathlib

    import numpy as np

    from fedjax_sim.attacks import sweep

    img = np.zeros((2, 8, 8, 1))
    rows = [{"attack": "ig", "setting": "baseline", "batch_size": 1, "psnr": 50.0,
             "exact_fraction": 0.0, "predicted_rate": None},
            {"attack": "closed_form", "setting": "baseline", "batch_size": 1, "psnr": 100.0,
             "exact_fraction": 1.0, "predicted_rate": None},
            {"attack": "imprint", "setting": "baseline", "batch_size": 16,
             "psnr": float("nan"), "exact_fraction": 0.7, "predicted_rate": 0.79}]
    monkeypatch.setattr(sweep, "defence_sweep",
                        lambda **kw: (rows, {"ig: baseline": (img, img)}))
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "attack_sweep.py"
    spec = importlib.util.spec_from_file_location("attack_sweep", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--output", str(tmp_path), "--small"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 3
    with open(tmp_path / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["attack"] for r in table] == ["ig", "closed_form", "imprint"]
    assert table[2]["psnr"] == ""  # NaN is written as an empty cell / JSON null
    with open(tmp_path / "sweep.json") as f:
        assert json.load(f)[2]["psnr"] is None
    for name in ("sweep.png", "grid.png"):
        assert os.path.getsize(tmp_path / name) > 1000
