"""Open a model for serving: the runtime, the eval transform, the class names and the
metadata, whatever the model is.

Interim: this opens stored models on the torch runtime (the same steps as `tk infer`'s torch
session). ``toolkit.predict.session.open_predictor`` (stored model *or* exported ``.onnx``
file) replaces it once it lands; the shape is the same, so only the import in
:mod:`toolkit.serve.run` changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from toolkit.errors import TkError

if TYPE_CHECKING:
    from toolkit.data.transforms import EvalTransform
    from toolkit.predict.runtime import Runtime


@dataclass
class OpenPredictor:
    """What serving needs of a model."""

    runtime: Runtime
    transform: EvalTransform
    classes: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    name: str = ""


@contextlib.contextmanager
def open_predictor(model: str | None, *, store: str | None = None, plugins: Any = None,
                   device: str = "auto", log: Any = None) -> Iterator[OpenPredictor]:
    """The model ``model`` (a stored model name; ``None``: the newest in the store, said
    through ``log``) on the torch runtime."""
    from model_store import ModelStore
    from toolkit.predict.infer import choose_model

    if model and model.lower().endswith(".onnx"):
        raise TkError(f"--model {model}: serving an exported .onnx file needs the ONNX "
                      "runtime of `tk infer`, not in this version; serve the stored model")
    st = ModelStore(store)
    name = choose_model(st, model, log or (lambda _m: None))
    st.info(name)  # a missing model fails here, before torch is imported

    from toolkit.data.transforms import eval_transform
    from toolkit.model.loading import load_model
    from toolkit.predict.torch_runtime import TorchRuntime

    loaded = load_model(name, st, plugins=plugins, device="cpu")
    transform = eval_transform(loaded.data_config)
    runtime = TorchRuntime(loaded.model, transform, device=device)
    yield OpenPredictor(runtime, transform, list(loaded.classes), loaded.meta, name)
