"""GUI-free helpers of the HSSLSegment Slicer module (no Qt, no torch).

- job_protocol: job.json (JobSpec), JSON-line events (parseLine), exit codes - stdlib only
- process: background job process control (JobProcess) - stdlib (+ psutil when present)
- annotated_slices: which slices were painted, named like the engine names them - numpy
- mrml_io: MRML volume/segmentation <-> job files - slicer core classes, vtk, numpy
- model_registry: bundled and saved models, the entries of the pretrained-model picker - stdlib
- dependencies: which Python packages the engine needs and which are missing - stdlib

Submodules are imported explicitly (``from HSSLSegmentLib.process import JobProcess``) so that the
stdlib-only parts work without Slicer.
"""
