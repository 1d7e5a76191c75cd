"""Hand-written GPU kernels (Triton, compiled at first use: no build step).

Each module here is about speed only; the models call them through the small backend functions
in :mod:`talkgen.models.attention`, which fall back to PyTorch where a kernel cannot run.
"""
