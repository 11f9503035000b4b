"""The errors slora_jax raises on purpose: a few specific types, raised where the problem is detected.

Callers tell them apart by type, never by message: the HTTP server maps each type to a status code
in one table (server/errors.py), the CLI prints the message on one line. Every type subclasses the
built-in exception a caller would naturally catch (ValueError for bad input, KeyError for an unknown
adapter, RuntimeError for a full pool), so `except ValueError` keeps working.

    SloraError
      ConfigError          a model/config file or option we cannot serve
      AdapterError         an adapter operation refused
        AdapterNotFound      no adapter registered under that name
        AdapterExists        the name is taken (pass replace=True)
        AdapterInUse         running requests use it
        InvalidAdapter       its files or weights are refused (the message says exactly why)
      RequestError         a request refused before it runs
        InvalidRequest       a bad field: empty prompt, sampling value out of range, no chat template, ...
        RequestTooLong       prompt (+ max_tokens) beyond max_model_len
      CapacityError        the pool cannot hold it (an adapter too large for it, a sequence that cannot fit now)
      ProcessLost          a process of a multi-process engine died, hangs or diverged: the engine cannot go on
"""
from __future__ import annotations

from typing import Optional


class SloraError(Exception):
    """Base of every error slora_jax raises on purpose. `param`: the argument or request field at fault."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class ConfigError(SloraError, ValueError):
    """A configuration file or value that we cannot serve."""


class AdapterError(SloraError, ValueError):
    """An adapter operation refused; the message says exactly why."""


class AdapterNotFound(AdapterError, KeyError):
    """No adapter is registered under that name."""


class AdapterExists(AdapterError):
    """An adapter is already registered under that name (and replace was not asked for)."""


class AdapterInUse(AdapterError):
    """Requests that are still running use the adapter."""


class InvalidAdapter(AdapterError):
    """The adapter's config or weights are refused (unsupported option, wrong shape, NaN, pickle, ...)."""


class RequestError(SloraError, ValueError):
    """A request refused before it runs."""


class InvalidRequest(RequestError):
    """A request field we cannot serve as given (empty prompt, sampling value out of range, ...)."""


class RequestTooLong(RequestError):
    """The prompt, or the prompt plus max_tokens, does not fit in max_model_len."""


class CapacityError(SloraError, RuntimeError):
    """The device pool cannot hold what was asked for."""


class ProcessLost(SloraError, RuntimeError):
    """A process of a multi-process engine (jax.distributed) died, stopped responding or diverged: no step can
    run without it, so the engine has stopped for good (the message says which process and why)."""


__all__ = ["SloraError", "ConfigError", "AdapterError", "AdapterNotFound", "AdapterExists", "AdapterInUse",
           "InvalidAdapter", "RequestError", "InvalidRequest", "RequestTooLong", "CapacityError",
           "ProcessLost"]
