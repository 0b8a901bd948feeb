"""``fedjax-sim privacy --mechanism ddg|skellam``: distributed DP under secure aggregation,
driven through an in-process parser and checked against the ledger itself."""

import json

import pytest

from fedjax_sim.privacy import SamplingSpec
from fedjax_sim.privacy.distributed import DEFAULT_BETA, DistributedNoise

from conftest import assert_one_line_error, run_privacy_cli


_run = run_privacy_cli


SAMPLING = ["--sampling", "poisson", "--rate", "0.01", "--population", "10000"]
RUN = ["--rounds", "300", "--delta", "1e-5"]
ENCODING = ["--clip-norm", "1", "--dim", "1000", "--bits", "16"]
BASE = [*SAMPLING, *RUN, *ENCODING]


def _want(kind, z, survivors=100, beta=DEFAULT_BETA):
    acc = DistributedNoise(kind, z, 1.0, 16, 1024, 100.0, beta=beta).ledger(
        SamplingSpec.poisson(0.01), delta=1e-5)
    acc.record_round(300, survivors=survivors)
    return acc.epsilon()


@pytest.mark.parametrize("kind", ["ddg", "skellam"])
def test_epsilon_matches_the_ledger(kind, capsys):
    rc, out, err = _run(["--mechanism", kind, "--noise-multiplier", "1.0", *BASE, "--json"],
                        capsys)
    assert rc == 0 and err == ""
    obj = json.loads(out)
    assert obj["epsilon"] == pytest.approx(_want(kind, 1.0), rel=1e-12)
    assert obj["padded_dim"] == 1024 and obj["expected_clients"] == 100.0
    assert obj["survivors"] == 100 and obj["neighboring_relation"] == "add_or_remove_one"
    rc, out, _ = _run(["--mechanism", kind, "--noise-multiplier", "1.0", *BASE], capsys)
    assert rc == 0 and len(out.strip().splitlines()) == 1
    assert out.startswith(f"epsilon = {obj['epsilon']:.6g} ") and "16-bit ring" in out


def test_dropout_and_beta_are_accounted(capsys):
    rc, out, _ = _run(["--mechanism", "ddg", "--noise-multiplier", "1.0", *BASE,
                       "--dropout", "0.3", "--beta", "0", "--json"], capsys)
    assert rc == 0
    obj = json.loads(out)
    assert obj["survivors"] == 70
    assert obj["epsilon"] == pytest.approx(_want("ddg", 1.0, 70, beta=0.0), rel=1e-12)
    assert obj["epsilon"] > _want("ddg", 1.0)


def test_target_epsilon_calibrates_the_noise(capsys):
    rc, out, _ = _run(["--mechanism", "skellam", "--target-epsilon", "3", *BASE, "--json"],
                      capsys)
    assert rc == 0
    obj = json.loads(out)
    assert obj["epsilon"] <= 3.0 and obj["epsilon"] == pytest.approx(3.0, rel=1e-3)
    assert _want("skellam", obj["noise_multiplier"]) == pytest.approx(obj["epsilon"])
    rc, out, _ = _run(["--mechanism", "skellam", "--target-epsilon", "3", *BASE], capsys)
    assert rc == 0 and out.startswith("noise_multiplier = ")


@pytest.mark.parametrize("argv,field", [
    (["--mechanism", "ddg", "--noise-multiplier", "1", *SAMPLING, *RUN, "--dim", "10"],
     "--clip-norm"),
    (["--mechanism", "ddg", "--noise-multiplier", "1", *SAMPLING, *RUN, "--clip-norm", "1"],
     "--dim"),
    (["--mechanism", "ddg", "--noise-multiplier", "1", "--sampling", "fixed",
      "--cohort-size", "10", "--population", "100", *RUN, *ENCODING], "--sampling"),
    (["--mechanism", "ddg", "--noise-multiplier", "1", *SAMPLING[:4], *RUN, *ENCODING],
     "--population"),
    (["--mechanism", "ddg", "--noise-multiplier", "1", *BASE, "--accountant", "pld"],
     "--accountant"),
    (["--mechanism", "ddg", "--noise-multiplier", "1", *BASE, "--dropout", "1"], "dropout"),
    (["--mechanism", "ddg", "--noise-multiplier", "1", *BASE, "--dropout", "0.995"],
     "dropout"),
    (["--mechanism", "skellam", "--noise-multiplier", "-1", *BASE], "noise_multiplier"),
    (["--mechanism", "ddg", "--noise-multiplier", "1", *BASE, "--bits", "40"], "bits"),
    (["--mechanism", "ddg", "--noise-multiplier", "1", *BASE, "--bits", "6"], "bits"),
    (["--mechanism", "ddg", "--target-epsilon", "0.2", *BASE, "--bits", "9"],
     "target_epsilon"),
    (["--mechanism", "ddg", "--noise-multiplier", "1", *BASE, "--max-rounds", "5"],
     "--max-rounds"),
    (["--noise-multiplier", "1", *SAMPLING, *RUN, "--bits", "16"], "--bits"),
    (["--noise-multiplier", "1", *SAMPLING, *RUN, "--dim", "16"], "--dim"),
])
def test_config_errors_exit_2_with_one_line(argv, field, capsys):
    assert_one_line_error(*_run(argv, capsys), field)
