"""Speech in: decode any audio or video file, resample to 16 kHz, normalise loudness, lay out two speakers."""

from talkgen.audio.decode import read_audio
from talkgen.audio.speakers import combine_speakers, write_mix
from talkgen.audio.speech import SAMPLE_RATE, load_speech, loudness_normalise, resample

__all__ = [
    "SAMPLE_RATE",
    "combine_speakers",
    "load_speech",
    "loudness_normalise",
    "read_audio",
    "resample",
    "write_mix",
]
