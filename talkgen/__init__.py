"""talkgen: a portrait (or a video) and speech in, a lip-synced talking video out."""

from talkgen.errors import InputError, ResourceError, TalkgenError, WeightsError

__version__ = "0.1.0"

__all__ = ["InputError", "ResourceError", "TalkgenError", "WeightsError", "__version__"]
