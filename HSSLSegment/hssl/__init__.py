"""HSSLSegment learning engine: few-slice fine-tuning, prediction and evaluation of 3D segmentation.

This package never imports `slicer` or `qt`. It runs in the Slicer module's background job
(`PythonSlicer -m hssl job ...`), from the `hssl` command line and from the headless scripts.

Array convention everywhere in the engine: numpy arrays are indexed ``[z, y, x]`` (k, j, i), the
order SimpleITK's ``GetArrayFromImage`` uses. Spacing, origin and direction are in SimpleITK's
order (x, y, z) and in LPS physical space (DICOM/ITK/Slicer-file convention), millimetres.
"""

import os as _os

# OpenMP threads that wait at a barrier spin by default; when another process (Slicer's user
# interface, a second job) shares the cores, that spinning made a CPU training step 2-4x slower
# here. Passive waiting costs nothing measurable on an idle machine. Must be set before torch loads.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
