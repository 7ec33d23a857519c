"""Multi-domain self-supervised pretraining of the engine's SegNet (a reconstruction of HSSL).

One module per concern: ``config`` (dataclasses from YAML/JSON + overrides), ``catalog`` (sources ->
tasks/groups -> preprocessed cache), ``sampling`` (balanced crops and their two views), ``heads`` and
``losses`` (the hierarchical loss), ``trainer`` (the loop, checkpoints, DDP), ``export`` (hssl model
folder and MONAI bundle), ``cli`` (``scripts/pretrain.py`` and ``python -m hssl.pretrain``).
See docs/pretraining.md.
"""
