"""GUI-free helpers of the HSSLSegment Slicer module (no Qt, no torch).

- job_protocol: job.json (hssl.jobspec's JobSpec), JSON-line events (parseLine), exit codes - stdlib only
- process: background job process control (JobProcess) - stdlib (+ psutil when present)
- segmentation_jobs: nodes -> job files -> engine -> nodes, for every kind of job - slicer core classes
- annotated_slices: which slices were painted, named like the engine names them - numpy, hssl.sparse
- mrml_io: MRML volume/segmentation <-> job files - slicer core classes, vtk, numpy
- editing: the annotation to paint, Segment Editor pointed at it, the slice a view shows - slicer core
- sample_data: the engine's sample scans as nodes, the tutorial's sparse annotation - slicer core, hssl.data
- model_registry: bundled and saved models, the models folder, the pretrained-model picker - stdlib
- training_chart: the live loss / held-out Dice chart as plot nodes - slicer core
- dependencies: which Python packages the engine needs, which are missing, Slicer's Python - stdlib

The engine modules imported here are its torch-free ones (hssl.jobspec, model_format, recipe,
sparse, data, errors); a test checks that importing this package never loads torch.

Submodules are imported explicitly (``from HSSLSegmentLib.process import JobProcess``) so that the
stdlib-only parts work without Slicer.
"""
