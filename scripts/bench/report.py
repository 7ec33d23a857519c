"""The outputs of a run: ``results.json``, ``results.md`` (tables), the plots and the README's
"Results" section; and rewriting them from an earlier ``results.json``."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from .analysis import compare, summarise, targets
from .environment import meta_line
from .settings import REPEAT_BELOW_CPU_S, REPO, RSS_LIMIT_MB, Settings, mode_settings


def _f(v, digits=3, unit=""):
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return f"{v:.{digits}f}{unit}" if isinstance(v, float) else f"{v}{unit}"


def _ms(st: dict, digits=3) -> str:
    if not st or st["mean"] is None:
        return "-"
    text = f"{st['mean']:.{digits}f}"
    if st["n"] > 1:
        text += f" ± {st['sd']:.{digits}f}"
    if st.get("missing"):
        text += f" ({st['missing']} undefined)"
    return text


def _budget_label(b: str) -> str:
    return b if b.endswith("%") else f"{b} slice{'s' if b != '1' else ''}"


def _new_baseline(results: dict) -> bool:
    """True when the run's baseline is the plain MONAI pipeline of ``baselines`` (MONAI's UNet);
    runs before it trained our own network the MONAI way."""
    return any(b.get("pipeline") == "monai-unet" for b in results["baseline"])


def _baseline_description(results: dict) -> str:
    if not _new_baseline(results):
        return ("Baseline: the same `SegNet` (same plan), `CacheDataset` -> `RandCropByPosNegLabeld` (pos 1, neg 1, "
                "crops from the whole volume; negative centres may be unannotated voxels) -> hssl's augmentations -> "
                "the same masked Dice+CE loss (unannotated voxels weigh zero), AdamW, learning-rate decay and "
                "clipping, the same number of steps; prediction: MONAI's default `sliding_window_inference` over the "
                "whole volume (overlap 0.25, constant blending), argmax, no post-processing.")
    return ("Baseline: the plain MONAI pipeline (`scripts/bench/baselines.py`): MONAI's `UNet` (channels 16-256, "
            "strides 2, 2 residual units), MONAI intensity normalisation, in-plane resampling to 1.5 mm (CT) or "
            "1 mm (MR) when finer, `CacheDataset` -> crops around painted voxels, every class equally often, "
            "painted background included (`ClassesToIndicesd` on the known voxels + `RandCropByLabelClassesd`), the "
            "patch at a random place inside (`RandSpatialCropd`) -> flips, 90-degree rotations, intensity shifts -> "
            "the masked Dice+CE loss (unannotated voxels weigh zero), AdamW 1e-3, the same number of steps as ours "
            "(batch 2); prediction: MONAI's default `sliding_window_inference` over the whole volume (overlap 0.25, "
            "constant blending), resized back to the scan's grid, argmax, no post-processing.")


def markdown(results: dict) -> str:
    meta, s = results["meta"], results["settings"]
    g = meta["git"]
    lines = [f"# HSSLSegment benchmark ({meta['mode']} mode)", "",
             f"- when: {meta['date']}; wall time {meta.get('benchmark_wall_s', '-')} s, CPU time "
             f"{meta.get('benchmark_cpu_s', '-')} s; load average "
             f"{meta['load_average_start']} at the start, {meta.get('load_average_end', '-')} at the end",
             f"- machine: {meta['platform']}, {meta['cpu']}, {meta['cpu_count']} CPUs ({meta['cpus_usable']} usable), "
             f"{meta['memory_gb']} GB",
             f"- device: {meta['device']}, {meta['threads']} thread(s); python {meta['python']}, "
             f"torch {meta['torch']}, "
             f"MONAI {meta['monai']}, numpy {meta['numpy']}, SimpleITK {meta['simpleitk']}, hssl {meta['hssl']}",
             f"- commit: {g['commit']}"
             + (f" (uncommitted changes in {', '.join(g['modified'])})" if g["dirty"] else ""),
             f"- fine-tuning budget: {s['steps']} steps per run (batch 2, hssl's CPU patch); seeds {s['seeds']}",
             "- bundled model: " + (f"{meta['bundled_model']['path']} ({meta['bundled_model']['name']}, created "
                                    f"{meta['bundled_model']['created']}, weights sha256 "
                                    f"{meta['bundled_model']['weights_sha256']})" if meta.get("bundled_model")
                                    else "none"), ""]
    lines += ["## 1. Few-slice quality", "",
              "Annotation: axial slices of the reference label spread through the structure (`hssl.fewslice.pick_slices`); "
              "budgets in % are of the slices that contain the structure, rounded up. **Dice/HD95** on the slices that "
              "were not annotated, after hssl's post-processing (the output equals the annotation on annotated slices, "
              "components not touching a painted voxel are removed); when every slice with the structure is annotated "
              "there is nothing unannotated to score and the whole volume is scored (marked *whole volume*). "
              "**volume Dice**: the whole volume (annotated slices included). **raw**: the network alone (no "
              "post-processing), same region as Dice. Mean ± SD over seeds.", "",
              "| case | budget | slices (of structure) | init | Dice | HD95 mm | volume Dice | raw Dice | scored on |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results["summary"]:
        shared = f" (= {', '.join(r['shared_with'])})" if r["shared_with"] else ""
        lines.append(f"| {r['case']} | {_budget_label(r['budget'])}{shared} | "
                     f"{r['n_slices']} of {r['structure_slices']} "
                     f"| {r['init']} | {_ms(r['dice'])} | {_ms(r['hd95_mm'], 1)} | {_ms(r['dice_volume'])} | "
                     f"{_ms(r['dice_raw'])} | {r['scored_on']} |")
    if results["summary"]:
        from hssl.pretrain.benchmark import table

        rows = [{"case": r["case"], "slices": _budget_label(r["budget"]), "init": r["init"], "dice": r["dice"]["mean"]}
                for r in results["summary"] if r["dice"]["mean"] is not None]
        lines += ["", "Dice per init (mean, then each value; the format of `python -m hssl.pretrain.benchmark`):", "",
                  table(rows)]
    if results["cross_volume"]:
        lines += ["", "### Cross-volume", "", "Fine-tuned on 3 slices of the source scan, applied to the whole target "
                  "scan (no annotation there, so no region and no post-processing); scored on the whole target volume.",
                  "", "| source -> target | init | seed | Dice | HD95 mm | predict s |", "|---|---|---|---|---|---|"]
        for r in results["cross_volume"]:
            if "error" in r:
                lines.append(f"| {r.get('source')} -> {r.get('target')} | | | error: {r['error']} | | |")
                continue
            lines.append(f"| {r['source']} -> {r['target']} | {r['init']} | {r['seed']} | {_f(r['dice'])} | "
                         f"{_f(r['hd95_mm'], 1)} | {_f(r['predict_s'], 1)} |")
    lines += ["", "## 2. Interactive speed", "",
              "Engine runs (fine-tune with hssl.finetune, then prediction in the annotation region with "
              "post-processing), 3-slice budget. *fine-tune -> prediction* excludes process start-up and file reading; "
              "the `hssl finetune --predict` rows below include them. *95 % held-out* = time until the held-out "
              "slice's Dice estimate first reached 95 % of its final value (the estimate is refreshed about 7 times "
              "during the first 70 % of the budget, so this is coarse). Peak RSS = the whole process (imports "
              "included). Times are wall time, CPU time in brackets.", "",
              "| volume | init | steps | steps/s (per CPU s) | fine-tune s (CPU) | predict s (CPU) | fine-tune -> "
              "prediction s | held-out Dice | 95 % held-out after s | peak RSS fine-tune / with predict MB | device |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    speed = [r for r in results["quality"] if "error" not in r and "3" in r["budgets"] and r["seed"] == s["seeds"][0]]
    speed += [r for r in results["interactive"] if r.get("kind") == "engine" and "error" not in r]
    for r in speed:
        shape = "x".join(str(v) for v in reversed(r["volume_shape"]))
        lines.append(f"| {r['case']} ({shape}) | {r['init']} | {r['steps']} | {_f(r['steps_per_s'], 2)} "
                     f"({_f(r['steps_per_cpu_s'], 2)}) | {_f(r['finetune_s'], 1)} ({_f(r['finetune_cpu_s'], 1)}) | "
                     f"{_f(r['predict_s'], 1)} ({_f(r['predict_cpu_s'], 1)}) | "
                     f"{_f(r['finetune_to_prediction_s'], 1)} | "
                     f"{_f(r['heldout_dice'])} | {_f(r['t95_s'], 1)} | "
                     f"{r['peak_rss_finetune_mb']} / {r['peak_rss_mb']} "
                     f"| {r['device']} |")
    cli = [r for r in results["interactive"] if r.get("kind") == "cli"]
    if cli:
        lines += ["", "`hssl finetune --predict` in a new process (what the Slicer job runs), launch to written "
                  "prediction:", "", "| case | budget | launch -> prediction s | start-up + reading s | fine-tune s | "
                  "steps | steps/s | predict s | held-out Dice | 95 % held-out after s | CPU s | peak RSS MB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in cli:
            if "error" in r:
                lines.append(f"| {r['case']} | {r['budget']} | error: {r['error']} |||||||||")
                continue
            b = r["budget"]
            budget = f"{b['time_budget']:.0f} s" if "time_budget" in b else f"{b['steps']} steps"
            lines.append(f"| {r['case']} | {budget} | {_f(r['press_to_prediction_s'], 1)} | "
                         f"{_f(r['startup_and_load_s'], 1)} | {_f(r['finetune_s'], 1)} | {r['steps']} | "
                         f"{_f(r['steps_per_s'], 2)} | {_f(r['predict_s'], 1)} | {_f(r['heldout_dice'])} | "
                         f"{_f(r['t95_s'], 1)} | {_f(r['cpu_s'], 1)} | {r['peak_rss_mb']} |")
    lines += ["", "### Prediction time and memory", "",
              "Each row is its own process; time includes intensity normalisation; peak RSS is the process's peak "
              "during the prediction (imports and the loaded volume included), *increase* = peak minus the RSS just "
              "before. `ours-roi`: hssl in the region of the annotation + post-processing (the product); `ours-full`: "
              "hssl over the whole volume (slabs, Gaussian blending); `monai-swi`: MONAI's default "
              "`sliding_window_inference` over the whole volume, argmax. "
              + (f"Predictions under {REPEAT_BELOW_CPU_S:.0f} s of CPU time ran up to {s['predict_repeats']} times, "
                 "each in a new process: the minimum of each measure is shown (*runs*), every value is in "
                 "results.json." if s["predict_repeats"] > 1 else "Each prediction ran once."), "",
              "| volume | method | model | wall s | CPU s | peak RSS MB | increase MB | Dice | scored on | runs | "
              "device |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["prediction"]:
        if "error" in r:
            lines.append(f"| {r.get('unit')} | error: {r['error']} ||||||||")
            continue
        shape = "x".join(str(v) for v in reversed(r["shape"]))
        dice = _f(r.get("dice")) if not (r["volume"] == "ct512" and r["method"] == "ours-roi") else "- (region only)"
        lines.append(f"| {r['volume']} ({shape}) | {r['method']} | {r['model']} | {_f(r['predict_s'], 1)} | "
                     f"{_f(r['predict_cpu_s'], 1)} | {r['peak_rss_mb']} | {r.get('peak_increase_mb')} | {dice} | "
                     f"{r.get('scored_on', '-')} | {r.get('repeats', 1)} | {r['device']} |")
    lines += ["", "## 3. Against a plain MONAI pipeline", "",
              _baseline_description(results) + " Ratios are ours / baseline "
              "(< 1: ours is faster or smaller), on CPU time (user + system: on this shared machine wall time also "
              "counts waiting for a core; wall-time ratios are given too); Dice difference = ours - baseline on the "
              "same region.", "",
              "| volume | comparison | CPU time ratio | ours CPU s | baseline CPU s | wall ratio | peak RSS ratio | "
              "ours MB | baseline MB | Dice ours - baseline | device |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in results["comparison"]:
        extra = ""
        if "baseline_crops_without_known_voxel" in c:
            parts = [f"baseline crops without a known voxel: {c['baseline_crops_without_known_voxel'] * 100:.0f} %"]
            if "baseline_patch" in c:
                parts.insert(0, f"{c['ours_steps']} vs {c['baseline_steps']} steps, MONAI patch "
                                + "x".join(str(v) for v in c["baseline_patch"]))
            if "dice_diff_same_inference" in c:
                parts.append(f"Dice difference with hssl's inference for both: {_f(c['dice_diff_same_inference'])}")
            extra = f" ({'; '.join(parts)})"
        lines.append(f"| {c['volume']} | {c['what']}: {c['ours']} vs {c['baseline']}{extra} | {_f(c['time_ratio'], 2)} "
                     f"| {_f(c['ours_cpu_s'], 1)} | {_f(c['baseline_cpu_s'], 1)} | {_f(c['wall_ratio'], 2)} | "
                     f"{_f(c['peak_rss_ratio'], 2)} | "
                     f"{c['ours_rss_mb']} | {c['baseline_rss_mb']} | {_f(c['dice_diff'])} | {c['device']} |")
    lines += ["", "## 4. Pretraining throughput", ""]
    p = results.get("pretrain_throughput")
    if p is None:
        lines.append("Not run (section not selected).")
    elif "error" in p:
        lines.append(f"error: {p['error']}")
    else:
        lines += [f"Config `{p['config']}` ({p['catalog_images']} images, crops {p['crop_size']}, "
                  f"{p['batch_pairs']} pairs "
                  f"per step), {p['steps']} steps per mode after one warm-up step, {p['device']}, {p['threads']} "
                  "thread(s); the step is the trainer's (forward, hierarchical loss, backward, clipping, AdamW). "
                  "Without prefetch each step times building its batch (`PairBatches.batch`) and training on it "
                  "separately, so *in memory* is the same steps without the building; with prefetch, the loader's "
                  "cost is the time a step waits for its batch. Overhead = loader time / step time.", "",
                  "| batches from | s/step | steps/s | loader s/step | loader overhead |", "|---|---|---|---|---|"]
        for k, v in p["modes"].items():
            lines.append(f"| {k} | {v['step_s']} | {v['steps_per_s']} | {v['data_s_per_step']} | "
                         f"{v['overhead'] * 100:.1f} % |")
    lines += ["", "## Targets", "", "| target | met | measured |", "|---|---|---|"]
    for t in results["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {met} | {t['measured']} |")
    errors = [r for key in ("quality", "baseline", "prediction", "cross_volume", "interactive") for r in results[key]
              if "error" in r]
    if errors or results["notes"]:
        lines += ["", "## Errors and notes", ""]
        lines += [f"- {r.get('unit', r.get('case'))}: {r['error']}" for r in errors]
        lines += [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def _footer(fig, meta: dict) -> None:
    fig.text(0.01, 0.005, meta_line(meta), fontsize=6, color="0.35", ha="left", va="bottom")


def plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = results["meta"]
    info = {"Description": meta_line(meta), "Software": "scripts/benchmark.py"}
    written = []

    def save(fig, name: str, bottom: float = 0.03) -> None:
        fig.tight_layout(rect=(0, bottom, 1, 1))
        _footer(fig, meta)
        fig.savefig(out / name, dpi=90, metadata=info)
        plt.close(fig)
        written.append(out / name)

    # Dice against annotated fraction, one panel per case, one line per init (+ the MONAI baseline).
    summary = results["summary"]
    cases = sorted({r["case"] for r in summary})
    fig, axes = plt.subplots(1, max(1, len(cases)), figsize=(4.2 * max(1, len(cases)), 3.6), squeeze=False)
    for ax, case in zip(axes[0], cases):
        for init in sorted({r["init"] for r in summary if r["case"] == case}, key=lambda i: (i != "scratch", i)):
            rs = sorted([r for r in summary if r["case"] == case and r["init"] == init
                        and r["dice"]["mean"] is not None],
                        key=lambda r: r["fraction"])
            seen, pts = set(), []
            for r in rs:
                if r["fraction"] not in seen:
                    seen.add(r["fraction"])
                    pts.append(r)
            if not pts:
                continue
            x = [r["fraction"] * 100 for r in pts]
            line = ax.errorbar(x, [r["dice"]["mean"] for r in pts], yerr=[r["dice"]["sd"] or 0 for r in pts],
                               marker="o", capsize=3, label=f"hssl, {init}")
            whole = [r for r in pts if r["scored_on"] == "whole volume"]
            if whole:
                ax.scatter([r["fraction"] * 100 for r in whole], [r["dice"]["mean"] for r in whole], s=90,
                           facecolors="none", edgecolors=line[0].get_color(), zorder=3)
        base = [b for b in results["baseline"] if b["case"] == case and "error" not in b and b.get("dice") is not None]
        if base:
            by_n: dict[int, list] = {}
            for b in base:
                by_n.setdefault(b["n_slices"], []).append(b["dice"])
            n_struct = next((r["structure_slices"] for r in summary if r["case"] == case), None)
            if n_struct:
                xs = sorted(by_n)
                ax.errorbar([min(1.0, n / n_struct) * 100 for n in xs], [np.mean(by_n[n]) for n in xs],
                            yerr=[np.std(by_n[n]) for n in xs], marker="s", linestyle="--", capsize=3, color="0.4",
                            label="plain MONAI pipeline")
        ax.set_title(case, fontsize=10)
        ax.set_xlabel("annotated: % of the slices with the structure", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_xlim(0, 105)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Dice on unannotated slices\n(circled: whole volume)")
    if cases:
        axes[0][0].legend(fontsize=7, loc="lower right")
    save(fig, "dice_vs_fraction.png")

    # Prediction time and peak RSS per volume and method.
    pred = [r for r in results["prediction"] if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    volumes = sorted({r["volume"] for r in pred}, key=lambda v: (v == "ct512", v))
    kinds = [("ours-roi", False), ("ours-full", False), ("monai-swi", False), ("monai-swi", True)]
    names = {("ours-roi", False): "ours, annotation region", ("ours-full", False): "ours, whole volume",
             ("monai-swi", False): "MONAI swi, our weights", ("monai-swi", True): "MONAI swi, MONAI-trained"}
    width = 0.8 / len(kinds)
    for ax, key, label in ((axes[0], "predict_cpu_s", "prediction CPU time (s)"),
                           (axes[1], "peak_rss_mb", "peak RSS of the process (MB)")):
        for k, kind in enumerate(kinds):
            xs, ys = [], []
            for i, v in enumerate(volumes):
                r = [r for r in pred if r["volume"] == v and (r["method"], r["model"].startswith("MONAI")) == kind]
                if r:
                    xs.append(i + (k - (len(kinds) - 1) / 2) * width)
                    ys.append(r[0][key])
            if xs:
                bars = ax.bar(xs, ys, width, label=names[kind])
                ax.bar_label(bars, fmt="%.0f" if key == "peak_rss_mb" else "%.3g", fontsize=6)
        if key == "peak_rss_mb":
            ax.axhline(RSS_LIMIT_MB, color="red", linestyle=":", linewidth=1, label="4 GB target")
        ax.set_xticks(range(len(volumes)))
        ax.set_xticklabels(volumes)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize=7)
    save(fig, "prediction_time_memory.png")

    # Held-out Dice estimate during fine-tuning.
    runs = [r for r in results["quality"] if "error" not in r and r.get("heldout_curve")]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in runs:
        curve = np.array(r["heldout_curve"])
        line, = ax.plot(curve[:, 0], curve[:, 1], marker=".",
                        label=f"{r['case']}, {r['n_slices']} slices, {r['init']}, seed {r['seed']}")
        if r.get("t95_s") is not None:
            ax.axvline(r["t95_s"], color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("fine-tuning time (s)")
    ax.set_ylabel("held-out slice Dice (estimate)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if runs:
        ax.legend(fontsize=6)
    ax.set_title("dotted: 95 % of the final estimate reached", fontsize=8)
    save(fig, "heldout_curves.png", bottom=0.04)
    return written


def readme_section(results: dict, out: Path, command: str) -> str:
    """The README's "Results" section, generated from the results."""
    meta, s = results["meta"], results["settings"]
    g = meta["git"]
    try:
        rel = out.resolve().relative_to(REPO).as_posix()
    except ValueError:
        rel = str(out)
    lines = ["## Results", "",
             f"Generated by `{command}` on {meta['date'][:10]} ({meta['benchmark_wall_s'] / 60:.1f} min, "
             f"{meta['benchmark_cpu_s'] / 60:.1f} CPU min): "
             f"{meta['cpu']}, {meta['cpu_count']} CPUs, {meta['memory_gb']} GB, {meta['platform']}; device "
             f"{meta['device']}, {meta['threads']} thread(s); torch {meta['torch']}, MONAI {meta['monai']}; commit "
             f"`{g['commit'][:10]}`{' (with uncommitted changes)' if g['dirty'] else ''}. Load average "
             f"{meta['load_average_start'][0]} at the start on {meta['cpu_count']} CPUs"
             + (": other jobs were running, so wall times include waiting for a core (CPU times do not)."
                if meta["load_average_start"][0] > 0.5 else "."), "",
             ("A synthetic volume (tiny mode: a check of the harness, not a result). " if meta["mode"] == "tiny" else
              "Real sample scans (pyradiomics `lung1`/`lung2` CT, `brain1`/`brain2` MR). ")
             + "The annotation is N axial slices of the reference label spread through the structure (as `hssl demo` "
             "picks them); Dice and HD95 are measured on the slices that were *not* annotated. "
             f"Every fine-tuning ran {s['steps']} steps ({'seeds ' + ', '.join(map(str, s['seeds']))}). "
             f"Full tables: [{rel}/results.md]({rel}/results.md), raw numbers: "
             f"[{rel}/results.json]({rel}/results.json), "
             "method and discussion: [docs/benchmarks.md](docs/benchmarks.md).", ""]
    summary = results["summary"]
    budgets = [b for b in ["1", "2", "3", "5", "5%", "10%", "100%"] if any(r["budget"] == b for r in summary)]
    if summary:
        lines += ["| case (slices with structure) | init | " + " | ".join(_budget_label(b) for b in budgets) + " |",
                  "|---|---|" + "---|" * len(budgets)]
        for case in sorted({r["case"] for r in summary}):
            for init in sorted({r["init"] for r in summary if r["case"] == case}, key=lambda i: (i != "scratch", i)):
                cells = []
                for b in budgets:
                    r = [r for r in summary if r["case"] == case and r["init"] == init and r["budget"] == b]
                    if not r:
                        cells.append("")
                        continue
                    r = r[0]
                    cell = f"{_ms(r['dice'], 2)}" + (" *" if r["scored_on"] == "whole volume" else "")
                    cells.append(cell + f" ({r['n_slices']})" if b.endswith("%") else cell)
                n = next(r["structure_slices"] for r in summary if r["case"] == case)
                lines.append(f"| {case} ({n}) | {init} | " + " | ".join(cells) + " |")
        lines += ["", "Dice on the unannotated slices (`*`: every slice with the structure was annotated, so the whole "
                  "volume is scored; the output equals the annotation on annotated slices, so a `*` value only "
                  "counts false positives on the other slices); for % budgets the number of slices is in brackets.",
                  ""]
    if results["cross_volume"]:
        cv = [r for r in results["cross_volume"] if "error" not in r]
        lines += ["Cross-volume (3 slices of one scan, whole other scan predicted): " + "; ".join(
            f"{r['source']} -> {r['target']} ({r['init']}, seed {r['seed']}) Dice {_f(r['dice'])}"
            for r in cv) + ".", ""]
    speed = [r for r in results["quality"] if "error" not in r and "3" in r["budgets"] and r["seed"] == s["seeds"][0]
             and r["init"] == "scratch"]
    speed += [r for r in results["interactive"] if r.get("kind") == "engine" and "error" not in r]
    if speed:
        lines += ["| volume (3 slices, scratch) | steps/s | fine-tune -> prediction | 95 % of held-out Dice after | "
                  "prediction | peak RSS |", "|---|---|---|---|---|---|"]
        for r in speed:
            shape = "x".join(str(v) for v in reversed(r["volume_shape"]))
            lines.append(f"| {r['case']} {shape} | {_f(r['steps_per_s'], 2)} | "
                         f"{_f(r['finetune_to_prediction_s'], 0)} s "
                         f"({r['steps']} steps) | {_f(r['t95_s'], 0, ' s')} | {_f(r['predict_s'], 1)} s | "
                         f"{r['peak_rss_mb']} MB |")
        cli = [r for r in results["interactive"] if r.get("kind") == "cli" and "error" not in r]
        for r in cli:
            b = r["budget"]
            budget = f"a {b['time_budget']:.0f} s budget" if "time_budget" in b else f"{b['steps']} steps"
            lines.append("")
            lines.append(f"`hssl finetune --predict` on {r['case']} with {budget}: {r['press_to_prediction_s']:.0f} s "
                         f"from launch to the written prediction ({r['startup_and_load_s']:.0f} s start-up and "
                         "reading, "
                         f"{r['steps']} steps at {r['steps_per_s']:.2f}/s, prediction {_f(r['predict_s'], 1)} s), "
                         f"peak RSS {r['peak_rss_mb']} MB.")
        lines.append("")
    comp = results["comparison"]
    if comp:
        lines += [("Against a plain MONAI pipeline (MONAI's `UNet`, crops centred on painted voxels, the masked loss, "
                   "the same number of steps, default `sliding_window_inference` on the whole volume):"
                   if _new_baseline(results) else
                   "Against a plain MONAI pipeline (same network and steps; `RandCropByPosNegLabeld` crops, the same "
                   "masked loss, default `sliding_window_inference` on the whole volume):"), "",
                  "| volume | comparison | CPU time ours/MONAI | peak RSS ours/MONAI | Dice ours - MONAI |",
                  "|---|---|---|---|---|"]
        for c in comp:
            lines.append(f"| {c['volume']} | {c['what']} | {_f(c['time_ratio'], 2)} ({_f(c['ours_cpu_s'], 1)} / "
                         f"{_f(c['baseline_cpu_s'], 1)} s) | {_f(c['peak_rss_ratio'], 2)} ({c['ours_rss_mb']} / "
                         f"{c['baseline_rss_mb']} MB) | {_f(c['dice_diff'], 3)} |")
        lines.append("")
    p = results.get("pretrain_throughput")
    if p and "error" not in p:
        lines += ["Pretraining (" + p["config"] + "): " + "; ".join(
            f"{k} {v['steps_per_s']:.2f} steps/s"
            + (f" (loader overhead {v['overhead'] * 100:.1f} %)" if k != "in memory" else "")
            for k, v in p["modes"].items()) + ".", ""]
    lines += ["| target | met | measured |", "|---|---|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['target']} | {({True: 'yes', False: '**no**', None: 'not measured'})[t['met']]} | "
                     f"{t['measured']} |")
    if results["notes"]:
        lines += [""] + [f"Note: {n}." for n in results["notes"]]
    lines += ["", f"![Dice against annotated fraction]({rel}/dice_vs_fraction.png)",
              f"![Prediction time and memory]({rel}/prediction_time_memory.png)", ""]
    return "\n".join(lines)


def write_outputs(results: dict, out: Path, command: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    results["meta"]["command"] = command
    paths = [out / "results.json", out / "results.md", out / "README-results.md"]
    paths[0].write_text(json.dumps(results, indent=1, default=str) + "\n")
    paths[1].write_text(markdown(results))
    paths[2].write_text(readme_section(results, out, command))
    paths += plots(results, out)
    (out / "results.partial.json").unlink(missing_ok=True)
    return paths


def rewrite_reports(results_path: Path, out: Path | None) -> int:
    """Re-derive summaries, comparisons, targets and every report from a results.json."""
    results = json.loads(results_path.read_text())
    # A run made before a setting existed ran with that setting's default (e.g. no repeated predictions).
    fields = dataclasses.fields(Settings)
    results["settings"] = {**{f.name: f.default for f in fields if f.default is not dataclasses.MISSING},
                           **results["settings"]}
    names = {f.name for f in fields}
    settings = {**dataclasses.asdict(mode_settings(results["settings"]["mode"])),
                **{k: v for k, v in results["settings"].items() if k in names}}
    s = Settings(**settings)
    results["summary"] = summarise(results)
    results["comparison"] = compare(results)
    results["targets"] = targets(results, s)
    paths = write_outputs(results, out or results_path.parent, results["meta"]["command"])
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
