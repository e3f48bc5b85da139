"""Build a reference Model from any model file through apr.open_model."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from apr import open_model
from apr.model import ModelView

from .backend import Backend, get_backend
from .model import Model


def model_from_view(view: ModelView, backend: Backend | None = None, dtype: Any = np.float32,
                    matmul: str | None = None) -> Model:
    """Dequantize every parameter the config implies to `dtype`, in the file's own rotary
    order (config.rope_type says which, and the model's rotary follows it)."""
    config = view.check_runnable()
    params = {name: view.tensors[name].numpy(dtype, order="stored") for name in config.tensor_shapes()}
    return Model(config, params, backend or get_backend("cpu"), dtype, matmul)


def load_model(path: str | os.PathLike, device: str = "cpu", dtype: Any = np.float32,
               verify: bool = True, matmul: str | None = None) -> tuple[Model, ModelView]:
    """(model, view) for a file or HF directory; the view carries tokenizer and metadata."""
    backend = get_backend(device)
    view = open_model(path, verify=verify)
    return model_from_view(view, backend, dtype, matmul), view
