"""Linear probe of pretrained networks on the real sample scans (frozen network, one 1x1x1 head per
level, summed; docs/pretraining.md, "Linear probe").

    OMP_NUM_THREADS=1 python scripts/linear_probe.py --out /tmp/probe --cases brain1 lung2 --slices 2 3 \
        --seeds 0 1 --init scratch hssl=bundled "dense=/path/model" --steps 300

Rows go to OUT/results.jsonl (an interrupted run resumes); a markdown table of Dice on the
unannotated slices is printed at the end. Exit code 2 with one ``error: ...`` line for bad input.
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE_MODULE_DIR = HERE.parent / "HSSLSegment"  # the engine package 'hssl' lives here in the source tree


def main() -> int:
    if (SOURCE_MODULE_DIR / "hssl" / "__init__.py").is_file() and str(SOURCE_MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(SOURCE_MODULE_DIR))
    try:
        from hssl.pretrain.probe import main as probe_main
    except ImportError as err:
        print(f"error: the HSSLSegment engine cannot be imported ({err}): install torch (in Slicer: the PyTorch "
              "extension) and the packages in HSSLSegment/HSSLSegmentLib/dependencies.py", file=sys.stderr)
        return 2
    return probe_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
