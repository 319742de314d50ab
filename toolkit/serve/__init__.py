"""`tk serve`: a stored model (torch) or an exported ``.onnx`` file (ONNX Runtime) behind
HTTP (FastAPI + uvicorn, the ``[serve]`` extra). The model is opened by
:func:`toolkit.predict.session.open_predictor`, as in `tk infer`.

- :mod:`toolkit.serve.batcher`: decoding off the event loop and dynamic batching (asyncio,
  one runtime call per batch, through :class:`toolkit.predict.runner.Runner`);
- :mod:`toolkit.serve.app`: routes, upload limit, API key, the HTML page (FastAPI);
- :mod:`toolkit.serve.run`: options, socket, uvicorn, graceful stop.

FastAPI and uvicorn are imported only inside these modules' functions.
"""
