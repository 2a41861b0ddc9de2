"""Our torch CLIP towers and the loaders that map checkpoints onto them."""
from .clip import ClipModel  # noqa: F401
