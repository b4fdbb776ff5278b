"""Extraction: run a torch model and keep the outputs of modules named by dotted path."""
from .hooks import Retain, resolve_modules
from .adapters import Encoded, ModelAdapter, CharAdapter, model_checksum, weights_checksum
from .image_adapter import ImageAdapter

__all__ = ["Retain", "resolve_modules", "Encoded", "ModelAdapter", "CharAdapter", "model_checksum", "weights_checksum", "ImageAdapter"]
