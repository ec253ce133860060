"""crushkv: KV-cache compression for Hugging Face transformers, built around KVCrush."""

from crushkv.api import cache_kwargs, compress
from crushkv.cache import CrushCache
from crushkv.models import load_model
from crushkv.policies import available_policies, parse_policy

__all__ = ["CrushCache", "available_policies", "cache_kwargs", "compress", "load_model", "parse_policy"]
__version__ = "0.1.0"
