"""freevlm: FREE early exits for BLIP-2-style vision-language models."""

from freevlm.backbones import load_backbone
from freevlm.errors import FreeVLMError
from freevlm.generation.api import DecodeOptions, EarlyExitVLM

__all__ = ["DecodeOptions", "EarlyExitVLM", "FreeVLMError", "load_backbone"]
__version__ = "0.1.0"
