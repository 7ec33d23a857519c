"""``python -m hssl.pretrain --config FILE ...`` (the same as scripts/pretrain.py)."""
import sys

from .cli import main

sys.exit(main())
