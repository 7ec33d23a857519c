"""HSSLSegment learning engine: few-slice fine-tuning, prediction and evaluation of 3D segmentation.

This package never imports `slicer` or `qt`. It runs in the Slicer module's background job
(`PythonSlicer -m hssl job ...`), from the `hssl` command line and from the headless scripts.

Array convention everywhere in the engine: numpy arrays are indexed ``[z, y, x]`` (k, j, i), the
order SimpleITK's ``GetArrayFromImage`` uses. Spacing, origin and direction are in SimpleITK's
order (x, y, z) and in LPS physical space (DICOM/ITK/Slicer-file convention), millimetres.
"""

__version__ = "0.1.0"
