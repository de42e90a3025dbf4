"""lora_lab: a hackable, from-scratch LoRA / QLoRA library in pure PyTorch."""

from lora_lab.config import Config
from lora_lab.model import GPT
from lora_lab.tokenizer import Tokenizer
from lora_lab.utils import LoraLabError

__all__ = ["GPT", "Config", "Tokenizer", "LoraLabError"]
__version__ = "0.1.0"
