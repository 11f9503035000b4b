"""Host-side memory management of the unified pool."""
from .pages import ADAPTER, FREE, KV, AdapterLoad, OutOfPages, PageTable

__all__ = ["PageTable", "OutOfPages", "AdapterLoad", "FREE", "KV", "ADAPTER"]
