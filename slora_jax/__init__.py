"""slora-jax: serve thousands of LoRA adapters on one accelerator over one shared base Llama."""
from .api import LLM, RequestHandle
from .engine.request import RequestOutput, SamplingParams, TokenLogprob
from .errors import (AdapterError, AdapterExists, AdapterInUse, AdapterNotFound, CapacityError, ConfigError,
                     InvalidAdapter, InvalidRequest, ProcessLost, RequestError, RequestTooLong, SloraError)

__all__ = ["LLM", "SamplingParams", "RequestOutput", "RequestHandle", "TokenLogprob", "SloraError", "ConfigError", "AdapterError",
           "AdapterNotFound", "AdapterExists", "AdapterInUse", "InvalidAdapter", "RequestError", "InvalidRequest",
           "RequestTooLong", "CapacityError", "ProcessLost"]
__version__ = "0.1.0"
