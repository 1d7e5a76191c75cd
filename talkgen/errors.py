"""One exception family whose messages say what is wrong and how to fix it.

The CLI prints ``str(error)`` and exits non-zero; the service maps the subclasses to HTTP codes.
"""

from __future__ import annotations


class TalkgenError(Exception):
    """Base class: the message is meant for a person, in one or two sentences."""


class InputError(TalkgenError):
    """Something the user submitted (an image, audio, a request field) cannot be used."""


class WeightsError(TalkgenError):
    """Weight files are missing, incomplete or of the wrong kind."""


class ResourceError(TalkgenError):
    """The machine lacks something at run time: memory, a GPU, a codec."""
