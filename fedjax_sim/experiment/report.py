"""The HTML report of a run folder, and a side-by-side comparison of several runs.

:func:`write_report` reads what ``fedjax-sim run --output DIR`` wrote (``metrics.jsonl``,
``summary.json`` and the reconstruction grids ``leakage/[imprint_|mclient_]round_NNNN.png``)
and writes one self-contained page, ``DIR/report.html``: inline CSS, plots and grids
embedded as base64 PNG, no script and no external resource, so it opens offline. The page
holds

* the run's status and key results (final accuracy, epsilon, canary estimate, bytes);
* accuracy: test and train accuracy and the losses per round;
* privacy: the privacy statement, the accountant's epsilon per round against the canary
  estimates (``epsilon_estimate*``) and the lower bound when the run audited itself, the
  ``audit`` block, and what the server sees;
* leakage: the ``leak_*`` metrics of each observed round (the honest-but-curious server's,
  the malicious server's ``leak_imprint_*`` and the malicious client's ``leak_mclient_*``)
  and the reconstruction grids, captioned by attacker;
* communication: cumulative bytes up and down per round and the totals;
* secure aggregation: the ``secagg_*`` diagnostics per round;
* poisoning (runs with an attack): backdoor success and the poisoning diagnostics;
* the configuration (one table per section) and the provenance.

A section whose data the run does not hold is left out. :func:`write_comparison` puts
several runs side by side: a results table, the configuration keys that differ between
them (only those), overlaid accuracy and epsilon curves, and each run's leakage grids.
``fedjax-sim report DIR [DIR ...]`` is the command line of both. A missing folder or file,
or a corrupt line, is a one-line ConfigError naming ``run_dir``. Plots need matplotlib;
without it the page holds the tables and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any, NamedTuple, Sequence

from fedjax_sim._validation import fail
from fedjax_sim.experiment import report_plots as rp
from fedjax_sim.experiment.outputs import METRICS, SUMMARY
from fedjax_sim.experiment.report_plots import Line, Panel

REPORT = "report.html"
COMPARISON = "comparison.html"
LEAKAGE = "leakage"
LEAK_PREFIX = "leak_"
ESTIMATES = ("epsilon_estimate", "epsilon_estimate_all_iterates")
LOWER_BOUND = "epsilon_lower_bound"
POISONING = ("backdoor_success", "num_malicious", "honest_cosine", "honest_inner_product",
             "honest_update_norm", "malicious_update_norm")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_GRID = re.compile(r"(?:(imprint|mclient)_)?round_(\d+)\.png")
_ATTACKER = {None: "", "imprint": "malicious server", "mclient": "malicious client"}


class Run(NamedTuple):
    """A run folder as read: its path, metrics rows, summary and leakage grids."""

    path: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    grids: list[tuple[int, str, bytes]]  # (round, attacker, PNG bytes), by round
    skipped: list[str]  # files in leakage/ named like a grid that are not PNGs

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))


def _read_json(run_dir: str, name: str, data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        fail("run_dir", run_dir, f"{name}{where} is not JSON ({getattr(e, 'msg', e)})")


def load_run(run_dir: Any) -> Run:
    """Reads a run folder; one-line ConfigErrors for a missing folder, file or bad line."""
    if not isinstance(run_dir, (str, os.PathLike)):
        fail("run_dir", run_dir, "must be a folder path")
    run_dir = os.fspath(run_dir)
    if not os.path.exists(run_dir):
        fail("run_dir", run_dir, "does not exist")
    if not os.path.isdir(run_dir):
        fail("run_dir", run_dir, "is not a folder")
    data = {}
    for name in (METRICS, SUMMARY):
        try:
            with open(os.path.join(run_dir, name), "rb") as f:
                data[name] = f.read()
        except FileNotFoundError:
            fail("run_dir", run_dir, f"holds no {name}: not a run folder "
                 "(fedjax-sim run --output DIR writes one)")
        except OSError as e:
            fail("run_dir", run_dir, f"{name} cannot be read ({e.strerror})")
    rows = []
    lines = data[METRICS].split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if number == len(lines):  # no newline at the end: a line cut short by a kill
            try:
                json.loads(line)
            except ValueError:
                break
        row = _read_json(run_dir, METRICS, line, f" line {number}")
        if not isinstance(row, dict):
            fail("run_dir", run_dir, f"{METRICS} line {number} is not a JSON object")
        rows.append(row)
    summary = _read_json(run_dir, SUMMARY, data[SUMMARY], "")
    if not isinstance(summary, dict):
        fail("run_dir", run_dir, f"{SUMMARY} is not a JSON object")
    grids, skipped = [], []
    folder = os.path.join(run_dir, LEAKAGE)
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        match = _GRID.fullmatch(name)
        if match is None or not os.path.isfile(os.path.join(folder, name)):
            continue
        with open(os.path.join(folder, name), "rb") as f:
            png = f.read()
        if png.startswith(PNG_SIGNATURE):
            grids.append((int(match.group(2)), _ATTACKER[match.group(1)], png))
        else:
            skipped.append(name)
    return Run(run_dir, rows, summary, sorted(grids, key=lambda g: g[0]), skipped)


# ---------------------------------------------------------------- reading values

def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(rounds, values) of the rows where ``key`` holds a number."""
    xs, ys = [], []
    for i, row in enumerate(rows):
        if _is_num(row.get(key)):
            r = row.get("round")
            xs.append(r if _is_num(r) else i + 1)
            ys.append(float(row[key]))
    return xs, ys


def _last(rows: list[dict], key: str) -> Any:
    return next((r[key] for r in reversed(rows) if r.get(key) is not None), None)


def _keys(rows: list[dict], prefix: str) -> list[str]:
    """The keys starting with ``prefix`` that some row holds a value for, in first-seen
    order."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update((k, None) for k, v in row.items() if k.startswith(prefix) and v is not None)
    return list(seen)


def _dict(mapping: Any, key: str) -> dict:
    value = mapping.get(key) if isinstance(mapping, dict) else None
    return value if isinstance(value, dict) else {}


def _attack(run: Run) -> str | None:
    kind = _dict(_dict(run.summary, "config"), "attack").get("kind", run.summary.get("attack"))
    return kind if isinstance(kind, str) else None


def _has_attack(run: Run) -> bool:
    return _attack(run) not in (None, "none") or bool(_series(run.rows, "backdoor_success")[0])


def _estimate(run: Run, key: str) -> Any:
    audit = _dict(run.summary, "audit")
    return audit[key] if audit.get(key) is not None else _last(run.rows, key)


def _accuracy(run: Run) -> str:
    acc = run.summary.get("test_accuracy", _last(run.rows, "test_accuracy"))
    return f"{acc:.4f}" if _is_num(acc) else rp.fmt(acc)


def _epsilon(run: Run) -> str:
    if "epsilon" not in run.summary:
        return rp.fmt(_last(run.rows, "epsilon"))
    eps = run.summary["epsilon"]
    return "inf (no DP guarantee)" if eps is None else rp.fmt(eps)


def _bytes_total(run: Run, key: str) -> Any:
    comm = _dict(run.summary, "communication")
    return comm[key] if comm.get(key) is not None else _last(run.rows, key)


def _mean(rows: list[dict], key: str) -> float | None:
    ys = _series(rows, key)[1]
    return sum(ys) / len(ys) if ys else None


def _lines(rows: list[dict], keys: Sequence[str], style: dict | None = None,
           label: Any = None) -> list[Line]:
    """One Line per key with values; ``label(key)`` names it (default: the key)."""
    out = []
    for key in keys:
        xs, ys = _series(rows, key)
        if xs:
            out.append(Line(label(key) if label else key, xs, ys, style))
    return out


def _kv(mapping: dict, fmt=rp.fmt) -> list[tuple[str, str]]:
    return [(k, fmt(v)) for k, v in rp.flatten(mapping).items()]


# ---------------------------------------------------------------- one run's sections

def _results(run: Run) -> str:
    s = run.summary
    rows: list[tuple[str, str]] = [("status", rp.fmt(s.get("status")))]
    if s.get("error"):
        rows.append(("error", rp.fmt(s["error"])))
    done = s.get("rounds_run", len(run.rows))
    rows += [("rounds", f"{done} of {s['rounds']}" if _is_num(s.get("rounds")) else rp.fmt(done)),
             ("final test accuracy", _accuracy(run)),
             ("final train loss", rp.fmt(_dict(s, "final").get("train_loss",
                                                             _last(run.rows, "train_loss")))),
             ("epsilon", _epsilon(run))]
    if _is_num(s.get("delta")):
        rows.append(("delta", rp.fmt(s["delta"])))
    for key in (*ESTIMATES, LOWER_BOUND, "backdoor_success"):
        value = _estimate(run, key) if key != "backdoor_success" else s.get(key)
        if value is not None:
            rows.append((key.replace("_", " "), rp.fmt(value)))
    rows += [(k.replace("_", " "), rp.fmt_bytes(_bytes_total(run, k)))
             for k in ("bytes_up_total", "bytes_down_total")]
    return rp.section("results", "Results", [rp.table(None, rows, "results-table")])


def _accuracy_section(run: Run) -> str:
    plot = rp.plot("plot-accuracy", [
        Panel("accuracy", "round", "accuracy", _lines(run.rows, ("test_accuracy",
                                                                 "train_accuracy"))),
        Panel("loss", "round", "loss", _lines(run.rows, ("train_loss", "test_loss")))])
    return rp.section("accuracy", "Accuracy", [plot]) if plot else ""


def _privacy_lines(rows: list[dict], color: str | None = None, prefix: str = "") -> list[Line]:
    base = {"color": color} if color else {}
    return (_lines(rows, ("epsilon",), base, lambda k: f"{prefix}{k} (accountant)")
            + _lines(rows, ESTIMATES, {**base, "linestyle": "--"}, lambda k: prefix + k)
            + _lines(rows, (LOWER_BOUND,), {**base, "linestyle": ":"}, lambda k: prefix + k))


def _privacy_section(run: Run) -> str:
    privacy, audit = _dict(run.summary, "privacy"), _dict(run.summary, "audit")
    lines = _privacy_lines(run.rows)
    if not (privacy or audit or lines):
        return ""
    parts = []
    if privacy.get("statement"):
        parts.append(f'<p class="statement">{rp.escape(privacy["statement"])}</p>')
    parts.append(rp.plot("plot-privacy", [Panel("epsilon per round", "round", "epsilon",
                                                 lines)]))
    rest = {k: v for k, v in privacy.items() if k != "statement"}
    for key in ("clip_norm", "clipped_fraction"):
        if _last(run.rows, key) is not None:
            rest[f"last {key}"] = _last(run.rows, key)
    if rest:
        parts.append(rp.table(None, _kv(rest), "privacy-table"))
    if audit:
        parts += ["<h3>Audit</h3>", rp.table(None, _kv(audit), "audit-table")]
    view = _dict(run.summary, "server_view")
    if view.get("sees"):
        parts.append(f"<p>The server sees {rp.escape(view['sees'])}.</p>")
    return rp.section("privacy", "Privacy", parts)


def _leakage_section(run: Run) -> str:
    keys, block = _keys(run.rows, LEAK_PREFIX), _dict(run.summary, "leakage")
    active = {who: {k: v for k, v in part.items() if k != "rounds"}
              for who, part in _dict(run.summary, "malicious").items()
              if isinstance(part, dict)}
    if not (keys or run.grids or block or active or run.skipped):
        return ""
    parts = []
    if keys:
        observed = [(row.get("round", i + 1), *(rp.fmt(row.get(k)) for k in keys))
                    for i, row in enumerate(run.rows)
                    if any(row.get(k) is not None for k in keys)]
        parts.append(rp.table(["round", *keys], observed, "leakage-table"))
    if block:
        parts.append(rp.table(None, _kv(block), "leakage-summary"))
    if active:
        parts.append(rp.table(None, _kv(active), "malicious-summary"))
    parts.append(rp.grids(run.grids))
    if run.skipped:
        skipped = rp.escape(", ".join(run.skipped))
        parts.append(f'<p class="note">not PNG files, left out: {skipped}</p>')
    return rp.section("leakage", "Leakage", parts)


def _communication_section(run: Run) -> str:
    comm = _dict(run.summary, "communication")
    plot = rp.plot("plot-bytes", [Panel("cumulative bytes", "round", "bytes", _lines(
        run.rows, ("bytes_up_total", "bytes_down_total")))])
    if not (comm or plot):
        return ""
    table = rp.table(None, [(k, rp.fmt_bytes(v)) for k, v in comm.items()], "bytes-table")
    return rp.section("communication", "Bytes sent", [plot, table if comm else ""])


def _secagg_section(run: Run) -> str:
    keys = _keys(run.rows, "secagg_")
    if not keys:
        return ""
    rows = [(k, rp.fmt(_mean(run.rows, k)), rp.fmt(max(_series(run.rows, k)[1], default=None)),
             rp.fmt(_last(run.rows, k))) for k in keys]
    return rp.section("secure", "Secure aggregation", [
        rp.table(["per round", "mean", "max", "last"], rows, "secagg-table")])


def _poisoning_section(run: Run) -> str:
    if not _has_attack(run):
        return ""
    plot = rp.plot("plot-poisoning", [
        Panel("attack", "round", "fraction", _lines(run.rows, ("backdoor_success",
                                                               "test_accuracy"))),
        Panel("honest alignment", "round", "cosine", _lines(run.rows, ("honest_cosine",)),
              ylim=(-1.05, 1.05))])
    keys = [*POISONING, *_keys(run.rows, "poisoning_")]
    table = [("attack", rp.fmt(_attack(run)))] + [
        (f"last {k}", rp.fmt(_last(run.rows, k))) for k in keys if _last(run.rows, k) is not None]
    if run.summary.get("backdoor_success") is not None:
        table.append(("final backdoor success", rp.fmt(run.summary["backdoor_success"])))
    return rp.section("poisoning", "Poisoning", [plot, rp.table(None, table, "poisoning-table")])


def _config_section(run: Run) -> str:
    config, parts = _dict(run.summary, "config"), []
    top = [(k, rp.fmt(v)) for k, v in config.items() if not isinstance(v, dict)]
    if top:
        parts.append(rp.table(None, top))
    for name, section in config.items():
        if isinstance(section, dict):
            parts += [f"<h3>[{rp.escape(name)}]</h3>",
                      rp.table(None, _kv(section), f"config-{name}")]
    provenance = _dict(run.summary, "provenance")
    if provenance:
        parts += ["<h3>Provenance</h3>", rp.table(None, _kv(provenance))]
    return rp.section("configuration", "Configuration", parts) if parts else ""


def render_report(run: Run) -> str:
    """The HTML page of one run (see the module docstring)."""
    return rp.page(f"fedjax-sim run {run.name}", [
        f"<h1>Run {rp.escape(run.name)}</h1>",
        f'<p class="note">{rp.escape(os.path.abspath(run.path))}</p>',
        _results(run), _accuracy_section(run), _privacy_section(run), _leakage_section(run),
        _communication_section(run), _secagg_section(run), _poisoning_section(run),
        _config_section(run)])


# ---------------------------------------------------------------- comparison

def _labels(runs: Sequence[Run]) -> list[str]:
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        names = [os.path.normpath(r.path) for r in runs]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return out


def config_differences(runs: Sequence[Run]) -> dict[str, list[Any]]:
    """``section.key`` -> each run's value, for the configuration keys whose values differ
    between the runs (a key some run lacks counts as differing); ``output.dir`` is left out:
    it names the folder, which the comparison's columns already do."""
    flat = [rp.flatten(_dict(r.summary, "config")) for r in runs]
    keys = dict.fromkeys(k for f in flat for k in f)
    missing = object()
    out = {}
    for key in keys:
        values = [f.get(key, missing) for f in flat]
        if key != "output.dir" and any(v is missing or v != values[0] for v in values):
            out[key] = ["(absent)" if v is missing else v for v in values]
    return out


def render_comparison(runs: Sequence[Run]) -> str:
    """The HTML page comparing ``runs`` side by side (see the module docstring)."""
    labels = _labels(runs)
    leak_keys = list(dict.fromkeys(k for r in runs for k in _keys(r.rows, LEAK_PREFIX)))
    rows = [("status", *(rp.fmt(r.summary.get("status")) for r in runs)),
            ("final test accuracy", *map(_accuracy, runs)),
            ("epsilon", *map(_epsilon, runs)),
            ("canary estimate", *(rp.fmt(_estimate(r, ESTIMATES[0])) for r in runs)),
            ("lower bound", *(rp.fmt(_estimate(r, LOWER_BOUND)) for r in runs))]
    rows += [(f"mean {k}", *(rp.fmt(_mean(r.rows, k)) for r in runs)) for k in leak_keys]
    rows += [(k.replace("_", " "), *(rp.fmt_bytes(_bytes_total(r, k)) for r in runs))
             for k in ("bytes_up_total", "bytes_down_total")]
    diffs = config_differences(runs)
    diff_part = (rp.table(["config key", *labels],
                          [(k, *map(rp.fmt, v)) for k, v in diffs.items()],
                          "config-differences") if diffs else
                 '<p class="note">the configurations are the same (apart from output.dir)</p>')
    colors = [f"C{i % 10}" for i in range(len(runs))]
    accuracy = rp.plot("plot-accuracy", [Panel("test accuracy", "round", "accuracy", [
        line for r, label, c in zip(runs, labels, colors)
        for line in _lines(r.rows, ("test_accuracy",), {"color": c}, lambda k, n=label: n)])])
    epsilon = rp.plot("plot-privacy", [Panel("epsilon per round", "round", "epsilon", [
        line for r, label, c in zip(runs, labels, colors)
        for line in _privacy_lines(r.rows, c, f"{label}: ")])])
    grids = "".join(f"<h3>{rp.escape(label)}</h3>{rp.grids(r.grids)}"
                    for r, label in zip(runs, labels) if r.grids)
    return rp.page("fedjax-sim comparison", [
        f"<h1>Comparison of {len(runs)} runs</h1>",
        rp.section("results", "Results", [rp.table(["", *labels], rows, "results-table")]),
        rp.section("config-diff", "Configuration differences", [diff_part]),
        rp.section("accuracy", "Accuracy", [accuracy]) if accuracy else "",
        rp.section("privacy", "Privacy", [epsilon]) if epsilon else "",
        rp.section("leakage", "Leakage", [grids]) if grids else ""])


# ---------------------------------------------------------------- writing and the CLI

def _write(path: Any, text: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        fail("output", path, "must be a file path")
    path = os.fspath(path)
    if os.path.isdir(path):
        fail("output", path, "is a folder: name the HTML file to write")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        fail("output", path, f"cannot be written ({e.strerror})")
    return path


def write_report(run_dir: Any, path: Any = None) -> str:
    """Writes the report of the run folder ``run_dir`` to ``path`` (default
    ``run_dir/report.html``); returns the path written."""
    run = load_run(run_dir)
    return _write(os.path.join(run.path, REPORT) if path is None else path,
                  render_report(run))


def write_comparison(run_dirs: Sequence[Any], path: Any) -> str:
    """Writes one page comparing the run folders ``run_dirs`` side by side to ``path``;
    returns the path written."""
    if isinstance(run_dirs, (str, bytes, os.PathLike)) or not run_dirs:
        fail("run_dirs", run_dirs, "must be a non-empty list of run folders")
    runs = [load_run(d) for d in run_dirs]
    return _write(path, render_comparison(runs))


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``report DIR [DIR ...] [--output FILE]`` to argparse ``subparsers``."""
    p = subparsers.add_parser(
        "report", help="an HTML report of a run folder, or a comparison of several",
        description="Write a self-contained HTML page (plots embedded, no external "
                    "resources) from run folders written by 'fedjax-sim run --output DIR'. "
                    "One DIR: its report, DIR/report.html by default. Several: one page "
                    f"comparing them side by side, ./{COMPARISON} by default. Prints the "
                    "path written.")
    p.add_argument("run_dirs", nargs="+", metavar="DIR", help="run folder(s)")
    p.add_argument("--output", metavar="FILE", default=None,
                   help=f"the HTML file to write (default: DIR/{REPORT} for one folder, "
                        f"./{COMPARISON} for several)")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> int:
    """The ``report`` subcommand: writes the page, prints its path, returns 0."""
    if len(args.run_dirs) == 1:
        path = write_report(args.run_dirs[0], args.output)
    else:
        path = write_comparison(args.run_dirs, args.output or COMPARISON)
    print(path)
    return 0


__all__ = ["COMPARISON", "REPORT", "Run", "add_parser", "config_differences", "load_run",
           "render_comparison", "render_report", "run_cli", "write_comparison",
           "write_report"]
