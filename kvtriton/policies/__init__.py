"""Eviction policies, one small class per file behind one interface, registered by name.

``make_policy("lru")``; ``available_policies()`` lists the names (``include_aliases=True`` adds
the original design's ``size_aware_lru`` and
``adaptive``, and ``hawkeye``); ``offline_policies()`` those that need the future.
"""

from .base import (EvictionPolicy, Key, available_policies, canonical_name, make_policy, offline_policies,
                   register_policy)
from .lru import LRUPolicy
from .fifo import FIFOPolicy
from .lfu import LFUPolicy
from .gdsf import GDSFPolicy
from .arc import ARCPolicy
from .s3fifo import S3FIFOPolicy
from .sieve import SievePolicy
from .belady import BeladyPolicy
from .prefix_aware import PrefixAwarePolicy
from .kv_hawkeye import KVHawkeyePolicy
from .session_aware import SessionAwarePolicy

__all__ = ["EvictionPolicy", "Key", "available_policies", "canonical_name", "make_policy", "offline_policies",
           "register_policy",
           "LRUPolicy", "FIFOPolicy", "LFUPolicy", "GDSFPolicy", "ARCPolicy", "S3FIFOPolicy", "SievePolicy",
           "BeladyPolicy", "PrefixAwarePolicy", "KVHawkeyePolicy", "SessionAwarePolicy"]
