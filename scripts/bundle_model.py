"""Ship a pretrained model folder with the extension, as ``--init bundled:NAME``.

    python scripts/bundle_model.py pretrain-output/dense/model dense --half \
        --description "Dense voxel-level pretraining on the sample scans"
    python scripts/bundle_model.py pretrain-output/samples/model default --overwrite   # the default: --init bundled

Copies model.json, the weights (``--half``: float16, half the size; fine-tuning loads them into
float32) and MODEL_CARD.md into ``HSSLSegment/Resources/Models/NAME/`` (``--root`` for another
Models folder), atomically. The Slicer module lists every folder there in its "Pretrained model" box.
Exit 0, or 2 with one ``error: ...`` line.
"""
import argparse
import sys
from pathlib import Path

SOURCE_MODULE_DIR = Path(__file__).resolve().parent.parent / "HSSLSegment"


def main(argv=None) -> int:
    if (SOURCE_MODULE_DIR / "hssl" / "__init__.py").is_file() and str(SOURCE_MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(SOURCE_MODULE_DIR))
    from hssl.errors import HSSLError
    from hssl.pretrain.export import install_bundled

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="a pretrained hssl model folder (<pretraining output>/model)")
    p.add_argument("name", help="the bundled name: default, dense, ...")
    p.add_argument("--half", action="store_true", help="store the weights as float16")
    p.add_argument("--description", default=None, help="replace the model's one-line description")
    p.add_argument("--root", default=None, help="Models folder (default: HSSLSegment/Resources/Models)")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    try:
        dest = install_bundled(a.source, a.name, a.half, a.description, a.root, a.overwrite)
    except HSSLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in dest.iterdir()) / 1e6
    init = "bundled" if a.name == "default" else f"bundled:{a.name}"
    print(f"bundled: {dest} ({size:.1f} MB): hssl finetune --init {init}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
