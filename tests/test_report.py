"""The HTML run report: one self-contained page (every image an embedded PNG, no external
resource), a section only where the run holds its data, values as the JSON files say,
a comparison that lists exactly the configuration keys that differ, and one-line errors
(exit status 2 from the command line) for a missing folder or a corrupt file."""

import base64
import io
import json
import os
import sys
from html.parser import HTMLParser

import numpy as np
import pytest

from fedjax_sim._validation import ConfigError
from fedjax_sim.experiment import report
from fedjax_sim.experiment.cli import main

PNG = b"\x89PNG\r\n\x1a\n"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}


class Page(HTMLParser):
    """Checks that tags balance; collects ids, images and the tables' cell texts."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.imgs, self.ids, self.tags = [], [], [], {}, []
        self.tables, self._cell = {}, None
        self.feed(text)
        self.close()
        assert not self.errors and not self.stack, (self.errors, self.stack)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            assert a["id"] not in self.ids, f"duplicate id {a['id']}"
            self.ids[a["id"]] = a
        if tag == "img":
            self.imgs.append(a)
        elif tag == "table":
            self._table = self.tables.setdefault(a.get("id", f"#{len(self.tables)}"), [])
        elif tag == "tr":
            self._table.append([])
        elif tag in ("th", "td"):
            self._cell = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag in ("th", "td"):
            self._table[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def rows(self, table_id):
        """The table as {first cell: other cells}."""
        return {r[0]: r[1:] for r in self.tables[table_id]}


def _decode_png(src):
    assert src.startswith("data:image/png;base64,"), src[:40]
    data = base64.b64decode(src.split(",", 1)[1], validate=True)
    assert data[:8] == PNG
    from PIL import Image
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.size[0] > 0 and image.size[1] > 0
    return data


def _check_page(path):
    """Parses the page and checks it is self-contained; returns the parsed Page."""
    text = open(path, encoding="utf-8").read()
    assert text.startswith("<!DOCTYPE html>")
    for bad in ("http://", "https://", "<script", "<link", "url("):
        assert bad not in text, bad
    page = Page(text)
    assert page.imgs, "no image"
    for img in page.imgs:
        _decode_png(img["src"])
        assert img.get("alt")
    assert text.count('src="') == len(page.imgs) and "href=" not in text
    return page


def _png_file(path, seed):
    from PIL import Image
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _fake_run(folder, *, rounds=6, dp=False, canaries=False, leakage=False, attack="none",
              backdoor=False, server=None, summary=None, extra=None):
    """A run folder written directly: metrics.jsonl, summary.json, leakage grids."""
    os.makedirs(folder)
    rows, up, down = [], 0, 0
    for r in range(1, rounds + 1):
        up, down = up + 1000 * r, down + 800 * r
        evaluated = r % 2 == 0 or r == rounds
        row = {"round": r, "train_loss": 2.0 / r, "train_accuracy": 0.1 * r,
               "num_clients": 10, "num_aggregated": 10, "seconds": 0.01,
               "bytes_up": 1000 * r, "bytes_down": 800 * r, "bytes_up_total": up,
               "bytes_down_total": down, "epsilon": 0.5 * r if dp else None,
               "test_loss": 2.5 / r if evaluated else None,
               "test_accuracy": 0.09 * r if evaluated else None}
        if canaries:
            row.update(epsilon_estimate=0.2 * r if evaluated else None,
                       epsilon_estimate_all_iterates=0.3 * r if evaluated else None,
                       epsilon_lower_bound=0.1 * r if evaluated else None)
        if leakage:
            observed = r in (2, 5)
            row.update(leak_label_accuracy=0.5 + r / 100 if observed else None,
                       leak_ig_psnr=10.0 + r if observed else None)
        if backdoor:
            row.update(backdoor_success=0.1 * r, honest_cosine=0.9, num_malicious=2)
        row.update(extra or {})
        rows.append(row)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    if leakage:
        os.makedirs(os.path.join(folder, "leakage"))
        for r in (2, 5):
            _png_file(os.path.join(folder, "leakage", f"round_{r:04d}.png"), r)
        with open(os.path.join(folder, "leakage", "notes.txt"), "w") as f:
            f.write("not a grid")
        with open(os.path.join(folder, "leakage", "round_0009.png"), "w") as f:
            f.write("a grid cut short")
    config = {"seed": 0, "data": {"num_clients": 100, "source": "label_skew"},
              "server": {"aggregator": "dp_fedavg" if dp else "mean",
                         "noise_multiplier": 1.0 if dp else None, **(server or {})},
              "attack": {"kind": attack}, "output": {"dir": str(folder)}}
    out = {"status": "completed", "rounds": rounds, "rounds_run": rounds,
           "test_accuracy": rows[-1]["test_accuracy"], "epsilon": rows[-1]["epsilon"],
           "delta": 1e-5, "config": config,
           "communication": {"bytes_up_total": up, "bytes_down_total": down},
           "privacy": {"dp": dp, "statement": "client-level DP <b>&amp; co</b>" if dp else
                       "no formal DP guarantee (no noise is added); epsilon = inf"},
           "server_view": {"sees": "every client's upload"}}
    if canaries:
        out["audit"] = {"canaries": 8, "epsilon_estimate": 1.2345, "epsilon_lower_bound": 0.6}
    if leakage:
        out["leakage"] = {"attack": "inverting_gradients", "observed_rounds": [2, 5]}
    out.update(summary or {})
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump(out, f)
    return str(folder)


def test_full_report_is_self_contained_and_matches_the_json(tmp_path):
    run = _fake_run(tmp_path / "dp_run", dp=True, canaries=True, leakage=True,
                    attack="backdoor", backdoor=True,
                    extra={"secagg_survivors": 10, "secagg_dropped": 0})
    path = report.write_report(run)
    assert path == os.path.join(run, "report.html")
    page = _check_page(path)
    for section in ("results", "accuracy", "privacy", "leakage", "communication",
                    "poisoning", "secure", "configuration"):
        assert section in page.ids, section
    summary = json.load(open(os.path.join(run, "summary.json")))
    results = page.rows("results-table")
    assert results["final test accuracy"] == [f"{summary['test_accuracy']:.4f}"]
    assert results["epsilon"] == [f"{summary['epsilon']:.4g}"]
    assert results["epsilon estimate"] == ["1.234"]  # the audit block's value, 4 digits
    up = summary["communication"]["bytes_up_total"]
    assert results["bytes up total"][0].startswith(f"{up:,} B")
    assert results["status"] == ["completed"]
    # The privacy plot holds the accountant's epsilon, both estimates and the lower bound.
    series = page.ids["plot-privacy"]["data-series"].split(" | ")
    assert series == sorted(["epsilon (accountant)", "epsilon_estimate",
                             "epsilon_estimate_all_iterates", "epsilon_lower_bound"])
    assert page.rows("audit-table")["canaries"] == ["8"]
    # The statement is text: its markup is escaped, not parsed.
    assert "b" not in page.tags and "&lt;b&gt;&amp;amp; co&lt;/b&gt;" in open(path).read()
    # Leakage: only the observed rounds, every leak_ column, and each grid file embedded.
    leak = page.tables["leakage-table"]
    assert leak[0] == ["round", "leak_label_accuracy", "leak_ig_psnr"]
    assert [r[0] for r in leak[1:]] == ["2", "5"] and leak[2][2] == "15"
    files = [open(os.path.join(run, "leakage", g), "rb").read()
             for g in sorted(os.listdir(os.path.join(run, "leakage")))]
    embedded = [_decode_png(i["src"]) for i in page.imgs if i["alt"].startswith("reconstruction")]
    assert embedded == [f for f in files if f.startswith(PNG)] and len(embedded) == 2
    assert "not PNG files, left out: round_0009.png" in open(path).read()
    assert page.rows("config-server")["aggregator"] == ["dp_fedavg"]
    assert page.rows("poisoning-table")["attack"] == ["backdoor"]
    assert page.rows("secagg-table")["secagg_survivors"] == ["10", "10", "10"]


def test_sections_appear_only_with_their_data(tmp_path):
    plain = Page(open(report.write_report(_fake_run(tmp_path / "plain"))).read())
    assert {"results", "accuracy", "privacy", "communication", "configuration"} <= set(plain.ids)
    for absent in ("leakage", "poisoning", "plot-privacy", "audit-table", "secure"):
        assert absent not in plain.ids, absent
    assert plain.rows("results-table")["epsilon"] == ["inf (no DP guarantee)"]
    # DP without canaries: the accountant's curve alone, no estimate, no lower bound.
    dp = Page(open(report.write_report(_fake_run(tmp_path / "dp", dp=True))).read())
    assert dp.ids["plot-privacy"]["data-series"] == "epsilon (accountant)"
    assert "epsilon estimate" not in dp.rows("results-table")
    # backdoor_success alone (no attack in the config) still shows the poisoning section.
    bd = Page(open(report.write_report(_fake_run(tmp_path / "bd", backdoor=True))).read())
    assert "poisoning" in bd.ids
    # A summary with hardly anything in it: the sections it lacks are left out.
    bare = _fake_run(tmp_path / "bare", rounds=2)
    with open(os.path.join(bare, "summary.json"), "w") as f:
        json.dump({"status": "failed", "error": "diverged <round 2>"}, f)
    page = Page(open(report.write_report(bare, tmp_path / "bare.html")).read())
    assert not {"privacy", "configuration", "leakage"} & set(page.ids)
    results = page.rows("results-table")
    assert results["error"] == ["diverged <round 2>"] and results["status"] == ["failed"]
    assert results["final test accuracy"] == [f"{0.09 * 2:.4f}"]  # from the last row


def test_comparison_lists_exactly_the_differing_config_keys(tmp_path):
    runs = [_fake_run(tmp_path / "none", leakage=True),
            _fake_run(tmp_path / "clip", leakage=True, server={"clip_norm": 1.0}),
            _fake_run(tmp_path / "dp_z1", dp=True, canaries=True, server={"clip_norm": 1.0})]
    path = report.write_comparison(runs, tmp_path / "cmp.html")
    page = _check_page(path)
    table = page.tables["results-table"]
    assert table[0] == ["", "none", "clip", "dp_z1"]
    results = page.rows("results-table")
    assert results["final test accuracy"] == [f"{0.54:.4f}"] * 3
    assert results["epsilon"] == ["inf (no DP guarantee)"] * 2 + ["3"]
    assert results["canary estimate"] == ["—", "—", "1.234"]
    assert results["lower bound"] == ["—", "—", "0.6"]
    assert results["mean leak_ig_psnr"] == ["13.5", "13.5", "—"]
    # output.dir differs everywhere but names the column; clip_norm is absent in one run.
    diffs = page.rows("config-differences")
    assert set(diffs) == {"config key", "server.aggregator", "server.noise_multiplier",
                          "server.clip_norm"}
    assert diffs["server.clip_norm"] == ["(absent)", "1", "1"]
    assert set(page.ids["plot-privacy"]["data-series"].split(" | ")) == {
        f"dp_z1: {k}" for k in ("epsilon (accountant)", "epsilon_estimate",
                                "epsilon_estimate_all_iterates", "epsilon_lower_bound")}
    grids = [i for i in page.imgs if i["alt"].startswith("reconstruction")]
    assert len(grids) == 4  # two runs with two grids each
    # Same configurations: no differences table; same folder names: labels by path.
    a, b = _fake_run(tmp_path / "a" / "run"), _fake_run(tmp_path / "b" / "run")
    same = Page(open(report.write_comparison([a, b], tmp_path / "same.html")).read())
    assert "config-differences" not in same.tables
    assert same.tables["results-table"][0][1:] == [os.path.normpath(a), os.path.normpath(b)]


def test_bad_input_is_one_line_naming_the_folder_and_line(tmp_path):
    good = _fake_run(tmp_path / "good")
    (tmp_path / "empty").mkdir()
    no_summary = _fake_run(tmp_path / "no_summary")
    os.remove(os.path.join(no_summary, "summary.json"))
    corrupt = _fake_run(tmp_path / "corrupt")
    lines = open(os.path.join(corrupt, "metrics.jsonl")).read().splitlines()
    lines[2] = lines[2][:-5]
    open(os.path.join(corrupt, "metrics.jsonl"), "w").write("\n".join(lines) + "\n")
    listed = _fake_run(tmp_path / "listed")
    open(os.path.join(listed, "summary.json"), "w").write("[1, 2]")
    cases = [(tmp_path / "missing", "does not exist"), (tmp_path / "empty", "no metrics.jsonl"),
             (os.path.join(good, "summary.json"), "is not a folder"),
             (no_summary, "no summary.json"), (corrupt, "metrics.jsonl line 3 is not JSON"),
             (listed, "summary.json is not a JSON object"), (3, "must be a folder path")]
    for folder, why in cases:
        with pytest.raises(ConfigError, match="^run_dir=") as e:
            report.write_report(folder)
        assert why in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="^run_dirs="):
        report.write_comparison([], tmp_path / "x.html")
    with pytest.raises(ConfigError, match="^output=.*is a folder"):
        report.write_report(good, tmp_path)
    # A last line cut short by a kill (no newline) is dropped, like the runner does.
    with open(os.path.join(good, "metrics.jsonl"), "a") as f:
        f.write('{"round": 7, "test_acc')
    assert Page(open(report.write_report(good)).read()).tables["results-table"]


def test_cli_writes_the_page_and_errors_are_one_line(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "missing"
    assert main(["report", str(missing)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines() == [
        f"fedjax-sim report: error: run_dir={str(missing)!r}: does not exist"]
    run = _fake_run(tmp_path / "run", dp=True)
    assert main(["report", run]) == 0
    assert capsys.readouterr().out.strip() == os.path.join(run, "report.html")
    _check_page(os.path.join(run, "report.html"))
    other = _fake_run(tmp_path / "other")
    monkeypatch.chdir(tmp_path)
    assert main(["report", run, other]) == 0  # several folders: ./comparison.html
    assert capsys.readouterr().out.strip() == "comparison.html"
    _check_page(tmp_path / "comparison.html")
    target = tmp_path / "out.html"
    assert main(["report", run, other, "--output", str(target)]) == 0
    assert "dp_fedavg" in target.read_text()
    with pytest.raises(SystemExit) as e:
        main(["report"])
    assert e.value.code == 2 and "required: DIR" in capsys.readouterr().err


def test_plots_leave_matplotlib_global_state_alone(tmp_path):
    import matplotlib
    backend, pyplot_loaded = matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules
    report.write_report(_fake_run(tmp_path / "run", dp=True))
    assert matplotlib.get_backend() == backend
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_loaded
