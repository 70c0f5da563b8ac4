from engine.block_manager.block_pool import BlockPool, KVBlock
from engine.block_manager.kv_cache_manager import KVCacheManager

__all__ = ["BlockPool", "KVBlock", "KVCacheManager"]
