"""Hypothesis over the configuration space of ``fedjax-sim run``.

* Every configuration holding a value outside its field's declared type or range is
  refused with one line that names that field (a ConfigError in Python; exit status 2
  and one stderr line from the command line), never a traceback.
* Every configuration, valid or not, either builds or gives such a one-line error.
* Every valid configuration (small sizes) runs a round: it completes, or it stops with a
  one-line error (a dead model, or a rule discovered while building the data); nothing
  else may escape.

Examples are derandomized so that CI sees the same cases on every run.
"""

import math

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedjax_sim._validation import ConfigError
from fedjax_sim.experiment.cli import main
from fedjax_sim.experiment.config import FIELDS, make_config
from fedjax_sim.experiment.reporters import TrainingDiverged
from fedjax_sim.experiment.runner import run_experiment

# Fields whose values name files or folders, or switch the output folder: covered by
# the loader and output tests.
FILES = {"data_path", "test_path", "output", "overwrite", "resume", "checkpoint_every"}
KEYS = sorted(k for k in FIELDS if k not in FILES)
FILE_SOURCES = ("npz", "leaf")

JUNK = st.sampled_from(["", "abc", "1e999", "-1e999", "nan", "inf", "0x10", "1,2,x",
                        "true?", "--", "1.5.2", "\x00", "é"])


def _invalid(spec):
    """Values the field's declaration alone refuses (type or range)."""
    m = spec.meta
    options = [JUNK]
    if spec.kind is str:
        choices = spec.choices()
        return st.text(min_size=1, max_size=8).filter(lambda s: s not in choices) \
            if choices else st.just([1, 2])
    if spec.kind is bool:
        return st.sampled_from(["maybe", "2", "yes", 1.5])
    if spec.kind is tuple:
        return st.sampled_from(["", "0", "-3", "a,b", "1.5", [0], []])
    nums = [math.nan, math.inf, -math.inf]
    if m["low"] is not None:
        nums += [m["low"] - 1] + ([m["low"]] if m["low_open"] else [])
    if m["high"] is not None:
        nums += [m["high"] * 10 + 1] + ([m["high"]] if m["high_open"] else [])
    if spec.kind is int:
        nums = [v for v in nums if not (isinstance(v, float) and math.isfinite(v)
                                        and v.is_integer() and _in_range(spec, v))]
        nums += [0.5, "1.5"]
    if m["zero_is_auto"]:  # 0 is the legacy spelling of "automatic"
        nums = [v for v in nums if v != 0]
    options.append(st.sampled_from(nums))
    return st.one_of(*options)


def _in_range(spec, v):
    m = spec.meta
    lo, hi = m["low"], m["high"]
    return not ((lo is not None and (v < lo or (m["low_open"] and v == lo)))
                or (hi is not None and (v > hi or (m["high_open"] and v == hi))))


def _any_value(spec):
    """Values of the right type anywhere in the field's range (often bad together)."""
    m = spec.meta
    if spec.kind is str:
        return st.sampled_from(spec.choices() or ("x",))
    if spec.kind is bool:
        return st.booleans()
    if spec.kind is tuple:
        return st.lists(st.integers(1, 64), min_size=1, max_size=3).map(tuple)
    lo = m["low"] if m["low"] is not None else -1e6
    hi = m["high"] if m["high"] is not None else 1e6
    if spec.kind is int:
        return st.integers(int(lo) + m["low_open"], min(int(hi) - m["high_open"], 2**31))
    return st.floats(lo, hi, exclude_min=m["low_open"], exclude_max=m["high_open"],
                     allow_nan=False)


def _names_a_field(message):
    paths = set(FIELDS) | {f"{s.section}.{s.name}" for s in FIELDS.values()}
    return any(message.startswith(p + "=") or f" {p}=" in message or f"{p}=" in message
               for p in paths)


def _check_one_line(error):
    message = str(error)
    assert "\n" not in message, message
    assert _names_a_field(message), message


@st.composite
def configs_with_a_bad_value(draw):
    keys = draw(st.lists(st.sampled_from(KEYS), min_size=0, max_size=4, unique=True))
    overrides = {k: draw(_any_value(FIELDS[k])) for k in keys}
    bad = draw(st.sampled_from(KEYS))
    overrides[bad] = draw(_invalid(FIELDS[bad]))
    return bad, overrides


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(configs_with_a_bad_value())
def test_a_value_outside_its_declaration_is_refused_naming_it(case):
    bad, overrides = case
    with pytest.raises(ConfigError) as e:
        make_config(overrides)
    _check_one_line(e.value)


@st.composite
def in_range_configs(draw):
    keys = draw(st.lists(st.sampled_from(KEYS), max_size=6, unique=True))
    return {k: draw(_any_value(FIELDS[k])) for k in keys}


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(in_range_configs())
def test_any_configuration_builds_or_is_refused_in_one_line(overrides):
    try:
        make_config(overrides)
    except ConfigError as e:
        _check_one_line(e)


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=configs_with_a_bad_value())
def test_the_command_line_refuses_bad_values_with_exit_2(case, capsys):
    capsys.readouterr()
    bad, overrides = case
    argv = ["run", "--no-progress"]
    for key, value in overrides.items():
        text = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
        argv.append(f"{FIELDS[key].flag}={text}")
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own one-line errors
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedjax-sim run: error: "), err
    assert "Traceback" not in err[0]


SMALL = {"num_clients": st.integers(2, 40), "max_examples": st.integers(1, 8),
         "min_examples": st.integers(1, 8), "cohort_size": st.integers(1, 10),
         "eval_clients": st.integers(1, 10), "local_epochs": st.integers(1, 2),
         "batch_size": st.integers(1, 8), "hidden": st.lists(
             st.integers(1, 8), min_size=1, max_size=2).map(tuple),
         "shards_per_client": st.integers(1, 4), "chunk_size": st.integers(1, 8)}
FREE = [k for k in KEYS if k not in SMALL and k not in ("rounds", "seed", "num_devices",
                                                        "eval_every", "max_empty_rounds")]


@st.composite
def small_valid_configs(draw):
    overrides = {"rounds": 1, "data": draw(st.sampled_from(
        [s for s in FIELDS["data"].choices() if s not in FILE_SOURCES]))}
    for key, strategy in SMALL.items():
        if draw(st.booleans()):
            overrides[key] = draw(strategy)
    for key in draw(st.lists(st.sampled_from(FREE), max_size=5, unique=True)):
        if key != "data":
            overrides[key] = draw(_any_value(FIELDS[key]))
    overrides.setdefault("num_clients", 20)
    overrides.setdefault("cohort_size", 5)
    overrides.setdefault("eval_clients", 5)
    overrides.setdefault("max_examples", 8)
    # Drop the field each one-line refusal names until the rest is a valid configuration.
    for _ in range(len(overrides)):
        try:
            return make_config(overrides)
        except ConfigError as e:
            _check_one_line(e)
            named = str(e).split("=", 1)[0]
            if named not in overrides or named in ("rounds", "data"):
                break
            del overrides[named]
    assume(False)


@pytest.mark.slow
@settings(max_examples=4, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(small_valid_configs())
def test_every_valid_configuration_runs_a_round(cfg):
    try:
        summary = run_experiment(cfg, progress=False)
    except (ConfigError, TrainingDiverged) as e:
        assert "\n" not in str(e), str(e)
        return
    assert summary["status"] == "completed" and summary["rounds_run"] == 1
