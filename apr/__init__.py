"""Model files: APR v2, HF safetensors and GGUF, seen through one canonical view."""
from .config import ModelConfig, PRESETS, preset
from .errors import AprError, ChecksumError, ConfigError, FormatError, UnsupportedError
from .model import ModelView, TensorRef, open_model

__all__ = ["AprError", "ChecksumError", "ConfigError", "FormatError", "ModelConfig", "ModelView",
           "PRESETS", "TensorRef", "UnsupportedError", "open_model", "preset"]
