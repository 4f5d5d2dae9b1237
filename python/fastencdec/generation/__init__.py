"""Generation with static KV caches for both architectures (``model.generate``).

``encoder_decoder.generate`` / ``decoder_only.generate`` are the models'
``generate`` methods; ``sampling`` picks tokens; ``kv_cache`` is the static cache;
``loop`` the shared decode loop; ``cuda_graph`` the optional GPU step capture.
"""

from .kv_cache import StaticKVCache
from .sampling import filter_top_k, filter_top_p, next_tokens

__all__ = ["StaticKVCache", "next_tokens", "filter_top_k", "filter_top_p"]
