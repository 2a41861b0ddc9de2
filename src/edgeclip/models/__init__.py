"""Our torch CLIP towers and the loaders that map checkpoints onto them."""
from .clip import ClipModel  # noqa: F401
from . import mci  # noqa: F401,E402  (registers the "mci" image tower kind)
from . import mobileclip_text, vit_mci  # noqa: F401,E402  (register the "repmixer" text and "vit-mci" image tower kinds)
