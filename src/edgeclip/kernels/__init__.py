"""Attention implementations (a registry the model calls by name) and, later, ONNX graph fusions."""
from .attention import attention_impls, get_attention, register_attention  # noqa: F401
