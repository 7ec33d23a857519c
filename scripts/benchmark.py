#!/usr/bin/env python
"""Benchmarks of the few-slice loop on the real sample scans, side by side with a plain MONAI pipeline.

What is measured, one heavy thing at a time, each in its own process so that its peak
memory is its own:

1. quality: N annotated axial slices of the reference label (spread through the structure as
   ``hssl demo`` picks them: ``hssl.fewslice.pick_slices``) for budgets of 1, 2, 3, 5 slices and 5 %,
   10 %, 100 % of the slices that contain the structure; inits (``scratch``, ``bundled`` when
   ``HSSLSegment/Resources/Models/default/model.json`` exists, or ``LABEL=PATH``); seeds. Dice and
   HD95 on the slices that were not annotated (when every slice with the structure is annotated,
   on the whole volume, and the row says so); the cross-volume setting (fine-tune on lung1,
   predict lung2; brain1 -> brain2).
2. interactive speed: fine-tune steps/s, fine-tune -> first prediction, time to 95 % of the final
   held-out Dice (from the training log), prediction time and peak RSS for the sample scans and
   for a CT-sized 512 x 512 x 300 volume (lung2 tiled along z); plus one real ``hssl finetune
   --predict`` command timed from launch to the written prediction.
3. the baseline: a plain MONAI pipeline (``bench/baselines.py``: MONAI's ``UNet``, MONAI
   transforms, crops centred on painted voxels, the masked loss, the same number of steps) applied
   with MONAI's default ``sliding_window_inference`` on the whole volume (no ROI, no post-processing).
4. pretraining throughput: steps/s with the real batch loader (``hssl.pretrain.sampling``) versus
   batches already in memory.

Outputs in ``--out``: ``results.json`` (everything, machine-readable), ``results.md`` (tables),
``dice_vs_fraction.png``, ``prediction_time_memory.png``, ``heldout_curves.png`` and
``README-results.md`` (the README "Results" section). Every output states the machine, device,
threads, torch/MONAI versions and the git commit.

    python scripts/benchmark.py                      # default: ~20 CPU minutes, one thread
    python scripts/benchmark.py --mode full          # all cases, budgets, seeds (hours on a CPU)
    python scripts/benchmark.py --mode tiny          # synthetic volume, a few steps (the test)
    python scripts/benchmark.py --only quality --cases brain1 --budgets 3 --steps 100
    python scripts/benchmark.py --suite fewslice     # every method side by side on the development set
    python scripts/benchmark.py --suite fewslice --tiny --out /tmp/suite   # one real crop (the test)

The code is the package ``scripts/bench/`` (docs/benchmarks.md lists its files).

Sample scans: ``hssl data fetch`` once (the default and full modes need them; tiny does not).
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "HSSLSegment"))  # the engine, from the source tree
sys.path.insert(0, str(HERE))  # the benchmark package: scripts/bench

from bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
