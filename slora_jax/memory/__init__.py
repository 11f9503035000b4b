"""Device memory: the pool's geometry, the pool, its page table and the adapter cache."""
from .layout import PoolLayout
from .pages import ADAPTER, FREE, KV, OutOfPages, PageTable

__all__ = ["ADAPTER", "FREE", "KV", "OutOfPages", "PageTable", "PoolLayout"]
