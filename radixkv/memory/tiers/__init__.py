"""KV tiers below the device pool: content-addressed pages on local disk or in a shared Redis."""

from radixkv.memory.tiers.codec import CorruptPage, decode_page, encode_page
from radixkv.memory.tiers.keys import page_keys, weights_fingerprint
from radixkv.memory.tiers.stores import FileStore, KVStore, RedisStore, StoreError, open_store
from radixkv.memory.tiers.tier import DEFAULT_PAGE_TOKENS, KVTier, PageRun

__all__ = ["DEFAULT_PAGE_TOKENS", "CorruptPage", "FileStore", "KVStore", "KVTier", "PageRun",
           "RedisStore", "StoreError", "decode_page", "encode_page", "open_store", "page_keys",
           "weights_fingerprint"]
