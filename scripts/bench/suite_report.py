"""The few-slice suite's outputs from its ``fewslice.json``: ``fewslice.md`` (every case, every method
and our default side by side, per-kind means, ours minus the best peer; time and memory; Dice per
class) and ``fewslice.png``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .environment import meta_line
from .methods import METHODS

MARGIN = 0.02  # the targets: beat the best peer per kind by this, never fall more than this below it


def _label(name: str) -> str:
    return METHODS[name].label if name in METHODS else name


def _peers(names: list[str]) -> list[str]:
    return [n for n in names if n in METHODS and METHODS[n].role == "peer"]


def method_order(results: dict) -> list[str]:
    present = {r["method"] for r in results["units"]}
    return [n for n in METHODS if n in present] + sorted(present - set(METHODS))


def cell_values(results: dict) -> dict:
    """{(case, n_slices): {method: [Dice of each seed]}} of the units that ran (a Dice that is None,
    nothing predicted where nothing is, is left out)."""
    cells: dict = {}
    for r in results["units"]:
        if "error" in r or r.get("dice") is None:
            continue
        cells.setdefault((r["case"], r["n_slices"]), {}).setdefault(r["method"], []).append(r["dice"])
    return cells


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def rows(results: dict) -> list[dict]:
    """One row per case and slice count: mean Dice per method, the best, ours minus the best peer."""
    names = method_order(results)
    peers = _peers(names)
    kinds = {r["case"]: r.get("kind", "?") for r in results["units"] if "kind" in r}
    whole = {(r["case"], r["n_slices"]) for r in results["units"] if r.get("scored_on") == "whole volume"}
    out = []
    for (case, n), by_method in sorted(cell_values(results).items(), key=lambda kv: (kinds.get(kv[0][0], "?"), kv[0])):
        means = {m: _mean(v) for m, v in by_method.items()}
        sds = {m: float(np.std(v)) if len(v) > 1 else None for m, v in by_method.items()}
        peer_means = [means[p] for p in peers if means.get(p) is not None]
        best_peer = max(peer_means) if peer_means else None
        ours = means.get("ours")
        out.append({"case": case, "kind": kinds.get(case, "?"), "n_slices": n, "means": means, "sds": sds,
                    "counts": {m: len(v) for m, v in by_method.items()}, "best": max(means.values()),
                    "best_peer": best_peer, "whole_volume": (case, n) in whole,
                    "ours_minus_best_peer": None if ours is None or best_peer is None else ours - best_peer})
    return out


def kind_means(table: list[dict], names: list[str]) -> list[dict]:
    """Per kind and slice count: each method's mean over the cases, and ours minus the best peer's mean."""
    out = []
    for kind, n in sorted({(r["kind"], r["n_slices"]) for r in table}):
        group = [r for r in table if (r["kind"], r["n_slices"]) == (kind, n)]
        means = {m: _mean([r["means"].get(m) for r in group]) for m in names}
        counts = {m: sum(r["means"].get(m) is not None for r in group) for m in names}
        peer_means = [means[p] for p in _peers(names) if means[p] is not None]
        best_peer = max(peer_means) if peer_means else None
        ours = means.get("ours")
        out.append({"kind": kind, "n_slices": n, "cases": len(group), "means": means, "counts": counts,
                    "best": max((v for v in means.values() if v is not None), default=None),
                    "ours_minus_best_peer": None if ours is None or best_peer is None else ours - best_peer})
    return out


def _cell(mean, sd=None, bold=False, star=False) -> str:
    if mean is None:
        return "-"
    text = f"{mean:.3f}" + (f" ± {sd:.3f}" if sd else "")
    return (f"**{text}**" if bold else text) + (" *" if star else "")


def _diff(v) -> str:
    return "-" if v is None else f"{v:+.3f}"


def markdown(results: dict) -> str:
    meta, s = results["meta"], results["settings"]
    names = method_order(results)
    table = rows(results)
    budget = (f"{s['time_budget']:.0f} s of training" if s.get("time_budget") else "") + \
        (f"{' or ' if s.get('time_budget') else ''}{s['steps']} steps" if s.get("steps") else "")
    g = meta["git"]
    lines = [f"# Few-slice comparison suite{' (tiny: a check of the harness, not a result)' if s.get('tiny') else ''}",
             "",
             f"- when: {meta['date']}{'; continued ' + ', '.join(meta['continued']) if meta.get('continued') else ''}; "
             f"machine: {meta['platform']}, {meta['cpu']}, {meta['cpu_count']} CPUs, {meta['memory_gb']} GB",
             f"- device: {meta['device']}, {s['threads']} thread(s) per unit, each unit a new process; torch "
             f"{meta['torch']}, MONAI {meta['monai']}; commit {g['commit']}" + (" (uncommitted changes)" if g["dirty"] else ""),
             f"- cases: {results.get('cases_from', '-')}; slices painted: {', '.join(map(str, s['slices']))}; seeds "
             f"{', '.join(map(str, s['seeds']))}; learned methods: {budget}",
             "- bundled model: " + (f"{meta['bundled_model']['name']} ({meta['bundled_model']['path']})"
                                    if meta.get("bundled_model") else "none"), "",
             "## Dice on the slices that were not painted", "",
             "N axial slices of each case's reference, spread through all its foreground (`hssl.fewslice`), are the "
             "painted slices of every method; Dice is the mean over the case's classes, on every slice that was not "
             "painted (`*`: every slice with the structure was painted, so the whole volume is scored), mean ± SD "
             "over seeds (Fill between slices and Grow from seeds are deterministic: one run). Bold: the best of the "
             "row. *ours - best peer*: our default minus the best of " + ", ".join(_label(p) for p in _peers(names))
             + ".", ""]
    lines += ["| case | kind | slices | " + " | ".join(_label(m) for m in names) + " | ours - best peer |",
              "|---|---|---|" + "---|" * len(names) + "---|"]
    for r in table:
        cells = [_cell(r["means"].get(m), r["sds"].get(m), r["means"].get(m) == r["best"], r["whole_volume"])
                 for m in names]
        lines.append(f"| {r['case']} | {r['kind']} | {r['n_slices']} | " + " | ".join(cells) +
                     f" | {_diff(r['ours_minus_best_peer'])} |")
    kinds = kind_means(table, names)
    for k in kinds:
        cells = []
        for m in names:
            partial = f" ({k['counts'][m]} of {k['cases']})" if 0 < k["counts"][m] < k["cases"] else ""
            cells.append(_cell(k["means"][m], bold=k["means"][m] == k["best"]) + partial)
        lines.append(f"| **mean, {k['kind']}** ({k['cases']} cases) | {k['kind']} | {k['n_slices']} | "
                     + " | ".join(cells) + f" | {_diff(k['ours_minus_best_peer'])} |")
    absent = [METHODS[m].label for m in METHODS if METHODS[m].role == "peer" and m not in names]
    lines += ["", _targets(table, kinds) + (f" Peers not in these results: {', '.join(absent)}." if absent else ""), ""]
    lines += _cost(results, names) + _final_steps(results) + _per_class(results, names) + _errors(results)
    return "\n".join(lines) + "\n"


def _final_steps(results: dict) -> list[str]:
    """For our units: the final step chosen on the held-out slice (overall and per segment) and the
    Dice every candidate would have given, so that what the choice gained or lost is visible."""
    from hssl.refine import CANDIDATES

    units = [r for r in results["units"] if r.get("final_step") and "error" not in r and r.get("dice") is not None]
    if not units:
        return []
    lines = ["## The final step", "",
             "Our runs choose their final step on the held-out slice (`hssl.refine`): the network alone, the "
             "network's sure voxels grown on the intensities (`network+grow`) or the painted slices grown alone "
             "(`grow`), per segment. Each column is the Dice that candidate gives on its own (measured after "
             "the timed prediction); *chosen* is what the run used.", "",
             "| case | slices | method | seed | chosen (per segment) | " + " | ".join(CANDIDATES) + " | chosen Dice |",
             "|---|---|---|---|---|" + "---|" * len(CANDIDATES) + "---|"]
    for r in sorted(units, key=lambda r: (r.get("kind", ""), r["case"], r["n_slices"], r["method"], r.get("seed") or 0)):
        record = r["final_step"]
        per = record.get("per_segment") or {}
        chosen = record.get("chosen", "?") + (" (" + ", ".join(f"{seg}: {c}" for seg, c in per.items()) + ")"
                                             if any(c != record.get("chosen") for c in per.values()) else "")
        scores = {name: v.get("dice") for name, v in (r.get("candidates") or {}).items()}
        uniform = record.get("chosen") if not any(c != record.get("chosen") for c in per.values()) else None
        if uniform is not None:
            scores.setdefault(uniform, r["dice"])
        cells = [_cell(scores.get(name)) for name in CANDIDATES]
        lines.append(f"| {r['case']} | {r['n_slices']} | {_label(r['method'])} | {r.get('seed')} | {chosen} | "
                     + " | ".join(cells) + f" | {_cell(r['dice'])} |")
    return lines + [""]


def readme_section(results: dict, command: str) -> str:
    """The README's results section: the main table (case, kind, every method, ours minus the best
    peer), the per-kind means, the targets and the time to the first prediction."""
    names = method_order(results)
    table = rows(results)
    kinds = kind_means(table, names)
    s = results["settings"]
    lines = [f"Development set: {len({r['case'] for r in table})} real scans in three kinds ("
             "[docs/sample-data.md](docs/sample-data.md) says how each reference was made), "
             f"{', '.join(map(str, s['slices']))} painted slices, seeds {', '.join(map(str, s['seeds']))}, "
             f"{s.get('time_budget') or s.get('steps')} {'s' if s.get('time_budget') else 'steps'} per learned "
             f"method, {s['threads']} CPU threads, every method on the same painted slices in the same run. Dice "
             "on the slices that were not painted (mean over classes and seeds; bold: best of the row).", "",
             "| case | kind | slices | " + " | ".join(_label(m) for m in names) + " | ours - best peer |",
             "|---|---|---|" + "---|" * len(names) + "---|"]
    for r in table:
        cells = [_cell(r["means"].get(m), bold=r["means"].get(m) == r["best"], star=r["whole_volume"]) for m in names]
        lines.append(f"| {r['case']} | {r['kind']} | {r['n_slices']} | " + " | ".join(cells)
                     + f" | {_diff(r['ours_minus_best_peer'])} |")
    for k in kinds:
        cells = [_cell(k["means"][m], bold=k["means"][m] == k["best"]) for m in names]
        lines.append(f"| **mean, {k['kind']}** | | {k['n_slices']} | " + " | ".join(cells)
                     + f" | **{_diff(k['ours_minus_best_peer'])}** |")
    lines += ["", _targets(table, kinds), ""]
    ours = [r for r in results["units"] if r.get("method") == "ours" and r.get("start_to_prediction_s")]
    if ours:
        t = [r["start_to_prediction_s"] for r in ours]
        lines += [f"Time from the start of fine-tuning to the written prediction (ours, default): median "
                  f"{np.median(t):.0f} s, at most {max(t):.0f} s, for a budget of {s.get('time_budget')} s.", ""]
    lines += [f"Command: `{command}`. Full tables (time and memory, the final step per run, Dice per class): "
              "[docs/results/fewslice/fewslice.md](docs/results/fewslice/fewslice.md); how it is measured: "
              "[docs/benchmarks.md](docs/benchmarks.md).", ""]
    return "\n".join(lines)


def _targets(table: list[dict], kinds: list[dict]) -> str:
    """The comparison's targets in words: per kind ours beats the best peer by MARGIN; no case more
    than MARGIN below it."""
    per_kind = [k for k in kinds if k["ours_minus_best_peer"] is not None]
    worst = [r for r in table if r["ours_minus_best_peer"] is not None]
    if not per_kind:
        return "Targets: not measured (no row has both our default and a peer)."
    beat = all(k["ours_minus_best_peer"] >= MARGIN for k in per_kind)
    low = [r for r in worst if r["ours_minus_best_peer"] < -MARGIN]
    return (f"Targets: our default beats the best peer by at least {MARGIN} in every kind: "
            f"{'**met**' if beat else '**missed**'} ("
            + ", ".join(f"{k['kind']} {k['n_slices']} slices {k['ours_minus_best_peer']:+.3f}" for k in per_kind)
            + f"); no case more than {MARGIN} below the best peer: {'**met**' if not low else '**missed**'}"
            + (" (" + ", ".join(f"{r['case']} {r['n_slices']} slices {r['ours_minus_best_peer']:+.3f}" for r in low)
               + ")" if low else "") + ".")


def _cost(results: dict, names: list[str]) -> list[str]:
    lines = ["## Time and memory", "",
             "Per method, over its units: training steps, steps per second, the training patch ([z, y, x] voxels), "
             "training and prediction seconds, *start to prediction* (from the method's start, the scan already in "
             "memory as in Slicer, to its prediction written to disk, imports included) and the largest peak RSS "
             "of a unit's process.", "",
             "| method | units | steps | steps/s | patch | train s | predict s | start to prediction s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in names:
        rs = [r for r in results["units"] if r["method"] == m and "error" not in r]
        if not rs:
            continue
        patches = sorted({"x".join(map(str, r["patch"])) for r in rs if r.get("patch")})

        def mean(key, digits=1):
            v = _mean([r.get(key) for r in rs])
            return "-" if v is None else f"{v:.{digits}f}"
        lines.append(f"| {_label(m)} | {len(rs)} | {mean('steps', 0)} | {mean('steps_per_s', 2)} | "
                     f"{', '.join(patches) or '-'} | {mean('train_s')} | {mean('predict_s')} | "
                     f"{mean('start_to_prediction_s')} | "
                     f"{max((r['peak_rss_mb'] for r in rs if r.get('peak_rss_mb')), default='-')} |")
    return lines + [""]


def _per_class(results: dict, names: list[str]) -> list[str]:
    """Dice per class for the cases with more than one class (mean over seeds)."""
    values: dict = {}
    for r in results["units"]:
        if "error" in r or len(r.get("classes", [])) < 2:
            continue
        for c in r["classes"]:
            values.setdefault((r["case"], r["n_slices"], c["name"]), {}).setdefault(r["method"], []).append(c["dice"])
    if not values:
        return []
    lines = ["## Dice per class", "", "Cases with several classes: each class's Dice on the unpainted slices (mean "
             "over seeds; `-`: absent from both the prediction and the reference there).", "",
             "| case | slices | class | " + " | ".join(_label(m) for m in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for (case, n, name), by_method in sorted(values.items()):
        means = {m: _mean(by_method.get(m, [])) for m in names}
        best = max((v for v in means.values() if v is not None), default=None)
        lines.append(f"| {case} | {n} | {name} | " + " | ".join(_cell(means[m], bold=means[m] == best) for m in names)
                     + " |")
    return lines + [""]


def _errors(results: dict) -> list[str]:
    errors = [r for r in results["units"] if "error" in r]
    if not errors and not results.get("notes"):
        return []
    return (["## Errors and notes", ""] + [f"- {r.get('unit', unit_name(r))}: {r['error']}" for r in errors]
            + [f"- {n}" for n in results.get("notes", [])] + [""])


def unit_name(r: dict) -> str:
    return f"{r.get('case')} {r.get('n_slices')} slices {r.get('method')} seed {r.get('seed')}"


def plot(results: dict, out: Path) -> Path:
    """``fewslice.png``: Dice per case (grouped by kind), one bar per method, one panel per slice count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = method_order(results)
    table = rows(results)
    counts = sorted({r["n_slices"] for r in table}) or [0]
    cases = []
    for r in table:
        if r["case"] not in cases:
            cases.append(r["case"])
    fig, axes = plt.subplots(len(counts), 1, figsize=(max(8.0, 0.3 * len(cases) * len(names) + 2), 3.2 * len(counts) + 0.5),
                             squeeze=False)
    width = 0.8 / max(1, len(names))
    for ax, n in zip(axes[:, 0], counts):
        for k, m in enumerate(names):
            xs, ys, errs = [], [], []
            for i, case in enumerate(cases):
                r = next((r for r in table if r["case"] == case and r["n_slices"] == n), None)
                if r is None or r["means"].get(m) is None:
                    continue
                xs.append(i + (k - (len(names) - 1) / 2) * width)
                ys.append(r["means"][m])
                errs.append(r["sds"].get(m) or 0.0)
            if xs:
                ax.bar(xs, ys, width, yerr=errs, capsize=2, label=_label(m))
        ax.set_xticks(range(len(cases)))
        kinds = {r["case"]: r["kind"] for r in table}
        ax.set_xticklabels([f"{c}\n({kinds[c]})" for c in cases], fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"Dice, {n} painted slices", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, ncol=len(names), loc="upper center")
    meta = results["meta"]
    fig.tight_layout(rect=(0, 0.03, 1, 1 - 0.4 / fig.get_figheight()))
    fig.text(0.01, 0.005, meta_line(meta), fontsize=6, color="0.35", ha="left", va="bottom")
    from hssl.io import atomic_write

    path = atomic_write(out / "fewslice.png", lambda tmp: fig.savefig(
        tmp, format="png", dpi=90,
        metadata={"Description": meta_line(meta), "Software": "scripts/benchmark.py --suite fewslice"}), what="plot")
    plt.close(fig)
    return path


def write_reports(results: dict, out: Path) -> list[Path]:
    """``fewslice.md`` and ``fewslice.png`` in ``out`` (created), each written to a temporary name
    and renamed."""
    from hssl.io import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    md = atomic_write_text(out / "fewslice.md", markdown(results), "benchmark table")
    command = results.get("command") or "python scripts/benchmark.py --suite fewslice"
    readme = atomic_write_text(out / "fewslice-README.md", readme_section(results, command), "README section")
    return [md, readme, plot(results, out)]


def rewrite(results_path: Path, out: Path | None) -> int:
    """``--report OUT/fewslice.json``: the tables and plot again, nothing run."""
    results = json.loads(results_path.read_text())
    written = write_reports(results, out or results_path.parent)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
