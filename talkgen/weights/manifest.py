"""The weight sets talkgen reads, with the file names of their released layouts.

Every error about missing weights names one of these and the command that fetches it.
"""

from __future__ import annotations

from talkgen.weights.loading import WeightSet

WAN_I2V_480P = WeightSet(
    name="Wan2.1-I2V-14B-480P",
    repo_id="Wan-AI/Wan2.1-I2V-14B-480P",
    download_command="talkgen download --model multitalk --dir DIR",
)
MULTITALK = WeightSet(
    name="MeiGen-MultiTalk",
    repo_id="MeiGen-AI/MeiGen-MultiTalk",
    download_command="talkgen download --model multitalk --dir DIR",
)
INFINITETALK_SINGLE = WeightSet(
    name="InfiniteTalk (single)",
    repo_id="MeiGen-AI/InfiniteTalk",
    download_command="talkgen download --model infinitetalk --people single --dir DIR",
)
INFINITETALK_MULTI = WeightSet(
    name="InfiniteTalk (multi)",
    repo_id="MeiGen-AI/InfiniteTalk",
    download_command="talkgen download --model infinitetalk --people multi --dir DIR",
)
WAV2VEC2 = WeightSet(
    name="chinese-wav2vec2-base",
    repo_id="TencentGameMate/chinese-wav2vec2-base",
    download_command="talkgen download --model multitalk --dir DIR",
)

# Folder names inside a weights directory, as the reference's README lays them out.
BASE_DIR = "Wan2.1-I2V-14B-480P"
MULTITALK_DIR = "MeiGen-MultiTalk"
INFINITETALK_DIR = "InfiniteTalk"
WAV2VEC2_DIR = "chinese-wav2vec2-base"

# Files of the base folder (original layout).
DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIT_SHARD_GLOB = "diffusion_pytorch_model-*-of-*.safetensors"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER_DIR = "google/umt5-xxl"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
VAE_FILE = "Wan2.1_VAE.pth"
MULTITALK_FILE = "multitalk.safetensors"
INFINITETALK_FILE = "infinitetalk.safetensors"  # under single/ or multi/
