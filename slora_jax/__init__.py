"""slora-jax: serve thousands of LoRA adapters on one accelerator over one shared base Llama."""
from .api import LLM
from .adapters.lora import AdapterError
from .engine.request import RequestError, RequestOutput, SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "AdapterError", "RequestError"]
__version__ = "0.1.0"
