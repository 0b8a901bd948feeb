"""The ``privacy`` subcommand, driven through an in-process argparse parser."""

import json

import pytest

from fedjax_sim.experiment import privacy_cli as cli
from fedjax_sim.experiment.cli import main
from fedjax_sim.experiment.flags import ArgumentParser
from fedjax_sim.privacy import (PrivacyConfig, SamplingSpec, dp_ftrl_epsilon, epsilon_for)

from conftest import assert_one_line_error


def _parser():
    parser = ArgumentParser(prog="fedjax-sim")
    cli.add_parser(parser.add_subparsers(dest="command"))
    return parser


def _run(argv, capsys):
    args = _parser().parse_args(["privacy", *argv])
    rc = args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


BASE = ["--sampling", "poisson", "--rate", "0.01", "--rounds", "1000", "--delta", "1e-5"]


def test_epsilon_text_and_json(capsys):
    want = epsilon_for(1000, PrivacyConfig(1.1, SamplingSpec.poisson(0.01)), 1e-5)
    rc, out, err = _run(["--noise-multiplier", "1.1", *BASE], capsys)
    assert rc == 0 and err == ""
    assert len(out.strip().splitlines()) == 1
    assert out.startswith(f"epsilon = {want:.6g} ")
    rc, out, _ = _run(["--noise-multiplier", "1.1", *BASE, "--json"], capsys)
    assert rc == 0
    obj = json.loads(out)
    assert obj["epsilon"] == pytest.approx(want, rel=1e-12)
    assert obj["neighboring_relation"] == "add_or_remove_one"


def test_fixed_size_sampling(capsys):
    rc, out, _ = _run(["--noise-multiplier", "1.0", "--sampling", "fixed", "--cohort-size",
                       "50", "--population", "5000", "--rounds", "100", "--delta", "1e-6",
                       "--json"], capsys)
    assert rc == 0
    obj = json.loads(out)
    want = epsilon_for(100, PrivacyConfig(1.0, SamplingSpec.fixed(50, 5000)), 1e-6)
    assert obj["epsilon"] == pytest.approx(want, rel=1e-12)
    assert obj["neighboring_relation"] == "replace_one"


def test_target_epsilon_prints_calibrated_noise(capsys):
    rc, out, _ = _run(["--target-epsilon", "2.0", *BASE, "--json"], capsys)
    assert rc == 0
    obj = json.loads(out)
    got = epsilon_for(1000, PrivacyConfig(obj["noise_multiplier"], SamplingSpec.poisson(0.01)),
                      1e-5)
    assert got <= 2.0 and got == pytest.approx(2.0, rel=2e-3)
    rc, out, _ = _run(["--target-epsilon", "2.0", *BASE], capsys)
    assert rc == 0 and out.startswith(f"noise_multiplier = {obj['noise_multiplier']:.6g} ")


def test_dp_ftrl_mechanism(capsys):
    rc, out, _ = _run(["--mechanism", "dp_ftrl_tree", "--noise-multiplier", "10",
                       "--rounds", "1000", "--delta", "1e-5", "--json"], capsys)
    assert rc == 0
    assert json.loads(out)["epsilon"] == pytest.approx(dp_ftrl_epsilon(10.0, 1000, 1e-5))
    rc, out, _ = _run(["--mechanism", "dp_ftrl_tree", "--target-epsilon", "2",
                       "--rounds", "1000", "--delta", "1e-5", "--json"], capsys)
    obj = json.loads(out)
    assert rc == 0 and obj["epsilon"] <= 2.0
    assert obj["epsilon"] == pytest.approx(2.0, rel=1e-4)


@pytest.mark.parametrize("argv,field", [
    (["--noise-multiplier", "1", "--sampling", "poisson", "--rate", "1.5", "--rounds", "10",
      "--delta", "1e-5"], "sampling_rate"),
    (["--noise-multiplier", "1", "--sampling", "poisson", "--rounds", "10",
      "--delta", "1e-5"], "--rate"),
    (["--noise-multiplier", "0", *BASE], "noise_multiplier"),
    (["--noise-multiplier", "1", "--sampling", "poisson", "--rate", "0.1", "--rounds", "10",
      "--delta", "1"], "delta"),
    (["--noise-multiplier", "1", "--sampling", "fixed", "--cohort-size", "20",
      "--population", "10", "--rounds", "10", "--delta", "1e-5"], "sampling.cohort_size"),
    (["--noise-multiplier", "1", "--sampling", "fixed", "--cohort-size", "2",
      "--population", "10", "--rounds", "10", "--delta", "1e-5", "--accountant", "pld"],
     "accountant"),
    (["--noise-multiplier", "1", "--rounds", "10", "--delta", "1e-5"], "--sampling"),
    (["--mechanism", "dp_ftrl_tree", "--noise-multiplier", "1", *BASE], "--sampling"),
])
def test_config_errors_exit_2_with_one_line(argv, field, capsys):
    assert_one_line_error(*_run(argv, capsys), field)


def test_noise_and_target_are_exclusive(capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["privacy", "--noise-multiplier", "1", "--target-epsilon", "1",
                              *BASE])
    assert e.value.code == 2
    capsys.readouterr()
    rc, out, err = _run(BASE, capsys)  # neither: one line naming the choice
    assert rc == 2 and err.startswith("fedjax-sim privacy: error: --noise-multiplier=None")


def test_flags_come_from_the_run_schema(capsys):
    """The shared flags carry the run's help and range, and the run's flat names work."""
    with pytest.raises(SystemExit):
        main(["privacy", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--sampling-rate FLOAT, --rate FLOAT" in text
    assert "--num-clients INT, --population INT" in text
    assert "in (0, 1]" in text
    rc, out, _ = _run(["--noise-multiplier", "1.1", "--sampling", "poisson",
                       "--sampling-rate", "0.01", "--rounds", "1000", "--delta", "1e-5",
                       "--json"], capsys)
    want = epsilon_for(1000, PrivacyConfig(1.1, SamplingSpec.poisson(0.01)), 1e-5)
    assert rc == 0 and json.loads(out)["epsilon"] == pytest.approx(want, rel=1e-12)
