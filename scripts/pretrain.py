"""HSSL-style multi-domain self-supervised pretraining, headless (a reconstruction; docs/pretraining.md).

Plain Python (torch + MONAI installed, this source tree or the installed extension):

    python scripts/pretrain.py --config configs/pretrain_small.yaml [--set train.max_steps=200 ...]

In Slicer (the PyTorch extension provides torch; the arguments follow ``--``):

    Slicer --no-main-window --python-script scripts/pretrain.py -- --config configs/pretrain_small.yaml

Several GPUs or machines (distributed data parallel):

    torchrun --nproc_per_node 4 scripts/pretrain.py --config my_config.yaml

Prints where the outputs are (log.csv, checkpoints, the hssl model folder, the MONAI bundle) and
exits 0 on success, 2 for bad input (one ``error: ...`` line), 3 when memory ran out.
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE_MODULE_DIR = HERE.parent / "HSSLSegment"  # the engine package 'hssl' lives here in the source tree


def main() -> int:
    if (SOURCE_MODULE_DIR / "hssl" / "__init__.py").is_file() and str(SOURCE_MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(SOURCE_MODULE_DIR))
    try:
        from hssl.pretrain.cli import main as pretrain_main
    except ImportError as err:
        print(f"error: the HSSLSegment engine cannot be imported ({err}): install torch (in Slicer: the PyTorch "
              "extension) and the packages in HSSLSegment/HSSLSegmentLib/dependencies.py", file=sys.stderr)
        return 2
    return pretrain_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
