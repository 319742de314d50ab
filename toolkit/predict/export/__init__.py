"""`tk export`: a stored model as one self-describing file (ONNX fp32 / int8, ``.pt2``,
TorchScript), checked against the eager model before it is written.

- :mod:`~toolkit.predict.export.artifact` — torch-free: the metadata schema, reading and
  checking an exported file (:func:`read_export`), opening an ONNX export in ONNX Runtime
  (:func:`open_onnx_session`); the ONNX runtime of ``tk infer`` uses it.
- :mod:`~toolkit.predict.export.images` — the parity / calibration images.
- :mod:`~toolkit.predict.export.formats` — model -> file bytes, file bytes -> runner.
- :mod:`~toolkit.predict.export.run` — :func:`export_model`, the command as a function.

Nothing is imported here, so the torch-free reader stays torch-free.
"""
