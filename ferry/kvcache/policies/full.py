"""`full`: every token's K/V kept exactly on the device and read by every query (the default)."""
from __future__ import annotations

from ferry.kvcache.policies.base import KVPolicy


class FullPolicy(KVPolicy):
    name = "full"
