"""The few-slice comparison suite (``scripts/benchmark.py --suite fewslice``) on its tiny variant: a
real crop of brain1, 3 painted slices, 3 training steps. Its Dice values mean nothing; what is
checked is that every method runs in its own process and writes a prediction on the case's grid,
that the results resume, and that the table puts every method side by side. The table arithmetic
is checked on hand-made rows."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "benchmark.py"
sys.path.insert(0, str(REPO / "scripts"))

from bench import devcases, methods, suite, suite_report  # noqa: E402
from hssl.model_format import DEFAULT_START  # noqa: E402

PEERS = (REPO / "scripts" / "bench" / "peers.py").is_file()


def run_suite(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--suite", "fewslice", "--tiny", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "out"
    proc = run_suite(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "fewslice.json").read_text()), proc.stdout


def test_every_method_runs_and_writes_its_prediction_on_the_grid(tiny):
    from hssl.fewslice import make_case
    from hssl.io import read_labels

    out, results, stdout = tiny
    expected = [m for m in methods.default_methods() if methods.missing(m) is None]
    # ours starts where the product does (DEFAULT_START); the other start runs next to it.
    other = "ours-pretrained" if DEFAULT_START == "scratch" else "ours-scratch"
    assert {"ours", other, "monai"} <= set(expected) and len({"ours-scratch", "ours-pretrained"} & set(expected)) == 1
    assert sorted(r["method"] for r in results["units"]) == sorted(expected)
    if not PEERS:
        assert "skipped Fill between slices" in stdout and any("Grow from seeds" in n for n in results["notes"])
    dev = devcases.load_case(devcases.TINY)
    case = make_case(dev.volume, dev.reference, 3, "axial")
    for r in results["units"]:
        assert "error" not in r, r.get("traceback")
        assert r["case"] == devcases.TINY and r["kind"] == "lesion" and r["n_slices"] == 3
        assert r["slices"] == case.slices and r["threads"] == 2 and r["scored_on"] == "unannotated slices"
        assert 0.0 <= r["dice"] <= 1.0 and r["start_to_prediction_s"] > 0 and r["peak_rss_mb"] > 50
        assert [c["name"] for c in r["classes"]] == [lab.name for lab in dev.reference.labels]
        pred = read_labels(r["prediction"], dev.volume.geometry).array
        assert pred.shape == case.sparse.shape
        if r["method"] != "monai":  # the product and Slicer's effects keep what was painted
            assert np.array_equal(pred[case.annotation.known], case.sparse[case.annotation.known])
        if r["method"] in ("ours", other, "monai"):
            assert r["steps"] == 3 and r["train_s"] > 0 and len(r["patch"]) == 3 and r["seed"] == 0
        else:
            assert r["seed"] is None and r["steps"] is None
    ours = {r["method"]: r for r in results["units"]}
    assert ours["ours"]["init"] == DEFAULT_START and ours[other]["init"] == ("bundled" if DEFAULT_START == "scratch"
                                                                            else "scratch")


def test_the_table_has_every_method_side_by_side(tiny):
    out, results, _ = tiny
    md = (out / "fewslice.md").read_text()
    assert "check of the harness" in md and results["meta"]["git"]["commit"] in md
    header = next(line for line in md.splitlines() if line.startswith("| case | kind | slices |"))
    for name in {r["method"] for r in results["units"]}:
        assert methods.METHODS[name].label in header
    assert header.endswith("| ours - best peer |")
    row = next(line for line in md.splitlines() if line.startswith(f"| {devcases.TINY} | lesion | 3 |"))
    assert "**" in row  # the best of the row
    assert "**mean, lesion** (1 cases)" in md and "## Time and memory" in md
    assert (out / "fewslice.png").stat().st_size > 5000


def test_a_run_continues_where_it_stopped(tiny, tmp_path):
    out, results, _ = tiny
    copy = tmp_path / "out"
    copy.mkdir()
    # As if killed after all but one unit: that unit alone runs again.
    kept = [r for r in results["units"] if r["method"] != "monai"]
    (copy / "fewslice.json").write_text(json.dumps({**results, "units": kept}))
    proc = run_suite(copy)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 unit(s) to run" in proc.stdout
    again = json.loads((copy / "fewslice.json").read_text())
    assert sorted(r["method"] for r in again["units"]) == sorted(r["method"] for r in results["units"])
    assert [r for r in again["units"] if r["method"] != "monai"] == kept  # the others untouched
    # Other settings would not compare with these results: refused before anything runs.
    proc = run_suite(copy, "--steps", "4")
    assert proc.returncode != 0 and "other settings" in proc.stderr and "steps" in proc.stderr


def test_report_rewrites_the_same_table(tiny, tmp_path):
    from bench import cli

    out, _, _ = tiny
    assert cli.main(["--report", str(out / "fewslice.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "fewslice.md").read_text() == (out / "fewslice.md").read_text()
    assert (tmp_path / "fewslice.png").stat().st_size > 5000


def unit(case, kind, method, dice, seed=0, n=3):
    return {"case": case, "kind": kind, "method": method, "dice": dice, "seed": seed, "n_slices": n,
            "scored_on": "unannotated slices", "classes": []}


def test_rows_means_and_ours_minus_best_peer_by_hand():
    results = {"units": [
        unit("a", "intensity", "ours", 0.80), unit("a", "intensity", "ours", 0.70, seed=1),
        unit("a", "intensity", "monai", 0.60), unit("a", "intensity", "grow-from-seeds", 0.90, seed=None),
        unit("b", "intensity", "ours", 0.50), unit("b", "intensity", "monai", 0.40),
        unit("b", "intensity", "grow-from-seeds", 0.30, seed=None),
        unit("c", "lesion", "ours", 0.60), unit("c", "lesion", "ours-scratch", 0.65),
        {**unit("c", "lesion", "monai", None), "error": "boom"},
    ]}
    table = {r["case"]: r for r in suite_report.rows(results)}
    a, b, c = table["a"], table["b"], table["c"]
    assert a["means"]["ours"] == pytest.approx(0.75) and a["sds"]["ours"] == pytest.approx(0.05)
    assert a["best"] == 0.90 and a["best_peer"] == 0.90 and a["ours_minus_best_peer"] == pytest.approx(-0.15)
    assert b["ours_minus_best_peer"] == pytest.approx(0.10)
    # ours-scratch is ours, not a peer; the failed MONAI unit is not a value: no peer in this row.
    assert c["best"] == 0.65 and c["best_peer"] is None and c["ours_minus_best_peer"] is None
    names = suite_report.method_order(results)
    assert names == ["ours", "ours-scratch", "monai", "grow-from-seeds"]
    kinds = {k["kind"]: k for k in suite_report.kind_means(list(table.values()), names)}
    k = kinds["intensity"]
    # Kind means: ours (0.75 + 0.50) / 2, MONAI 0.50, Grow from seeds 0.60 -> ours - best peer +0.025.
    assert k["means"]["ours"] == pytest.approx(0.625) and k["means"]["grow-from-seeds"] == pytest.approx(0.60)
    assert k["ours_minus_best_peer"] == pytest.approx(0.025) and k["cases"] == 2
    text = suite_report._targets(list(table.values()), list(kinds.values()))
    assert "every kind: **met**" in text and "below the best peer: **missed** (a 3 slices -0.150)" in text
    md_rows = suite_report.markdown({"units": results["units"], "notes": [], "cases_from": "hand-made",
                                     "settings": {"slices": [3], "seeds": [0, 1], "threads": 2, "time_budget": 150,
                                                  "steps": None},
                                     "meta": {"date": "d", "platform": "p", "cpu": "c", "cpu_count": 2,
                                              "memory_gb": 1, "device": "cpu", "torch": "t", "monai": "m",
                                              "git": {"commit": "abc", "dirty": False}, "bundled_model": None}})
    assert "| a | intensity | 3 | 0.750 ± 0.050 | - | 0.600 | **0.900** | -0.150 |" in md_rows
    assert "- c 3 slices monai seed 0: boom" in md_rows


def test_units_put_methods_side_by_side_and_deterministic_peers_once():
    s = suite.SuiteSettings(cases=["x"], slices=[3, 5], seeds=[0, 1], methods=["ours", "grow-from-seeds"],
                            time_budget=150.0, steps=None)
    units = [(u["n_slices"], u["method"], u["seed"]) for u in suite.planned(s)]
    assert units == [(3, "ours", 0), (3, "grow-from-seeds", None), (3, "ours", 1),
                     (5, "ours", 0), (5, "grow-from-seeds", None), (5, "ours", 1)]
