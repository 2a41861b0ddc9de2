"""numpy-only runtime: tokenizer, preprocessing, backends and Pipeline. Never imports torch."""
from .manifest import read_manifest  # noqa: F401
from .pipeline import Pipeline, Prediction  # noqa: F401
from .preprocess import Preprocessor, load_image  # noqa: F401
from .tokenizer import tokenize  # noqa: F401
