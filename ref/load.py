"""Build a reference Model from any model file through apr.open_model."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from apr import open_model
from apr.model import ModelView

from .backend import Backend, get_backend
from .memory import resolve_budget
from .model import Model
from .weights import MemoryPlan, StreamedWeights


def model_from_view(view: ModelView, backend: Backend | None = None, dtype: Any = np.float32,
                    matmul: str | None = None, memory: MemoryPlan | None = None) -> Model:
    """Dequantize every parameter the config implies to `dtype`, in the file's own rotary
    order (config.rope_type says which, and the model's rotary follows it). With a
    ``memory`` plan that says streamed (`plan_memory`), the parameters stay in the file and
    are converted a layer at a time as the model runs (`ref.weights.StreamedWeights`)."""
    config = view.check_runnable()
    backend = backend or get_backend("cpu")
    if memory is not None and memory.streamed:
        return Model(config, StreamedWeights(view, config, backend, dtype, memory.prefetch),
                     backend, dtype, matmul)
    params = {name: view.tensors[name].numpy(dtype, order="stored") for name in config.tensor_shapes()}
    return Model(config, params, backend, dtype, matmul)


def plan_memory(view: ModelView, dtype: Any = np.float32, max_memory: str | None = None) -> MemoryPlan:
    """How the model of ``view`` will be held under ``--max-memory`` (None: the default
    budget, from the memory the machine has available)."""
    budget, source = resolve_budget(max_memory)
    return MemoryPlan.of(view.check_runnable(), dtype, budget, source)


def load_model(path: str | os.PathLike, device: str = "cpu", dtype: Any = np.float32,
               verify: bool = True, matmul: str | None = None,
               max_memory: str | None = None, say=None) -> tuple[Model, ModelView]:
    """(model, view) for a file or HF directory; the view carries tokenizer and metadata.
    The memory plan (`plan_memory`) is passed to ``say`` (a function of one line) first."""
    backend = get_backend(device)
    view = open_model(path, verify=verify)
    plan = plan_memory(view, dtype, max_memory)
    if say is not None:
        say(plan.describe())
    return model_from_view(view, backend, dtype, matmul, plan), view
