"""`tk serve`: a stored model behind HTTP (FastAPI + uvicorn, the ``[serve]`` extra).

- :mod:`toolkit.serve.opener`: the model -> runtime, transform, classes, metadata;
- :mod:`toolkit.serve.batcher`: decoding off the event loop and dynamic batching (asyncio,
  one runtime call per batch, through :class:`toolkit.predict.runner.Runner`);
- :mod:`toolkit.serve.app`: routes, upload limit, API key, the HTML page (FastAPI);
- :mod:`toolkit.serve.run`: options, socket, uvicorn, graceful stop.

FastAPI and uvicorn are imported only inside these modules' functions.
"""
