"""numpy-only runtime: tokenizer, preprocessing, backends and Pipeline. Never imports torch."""
from .tokenizer import tokenize  # noqa: F401
