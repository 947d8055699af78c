"""The eviction-policy interface and its registry.

Policies know nothing of tensors: keys (block ids or block hashes) in, victims out. A key is *resident*
from ``insert`` until it is returned by ``victim`` or passed to ``remove``. A resident key may be
*pinned* (in use by a running sequence: never a victim) and *unpinned* again; a policy keeps a pinned
key's history (recency, frequency, ARC list) so that releasing a block does not reset it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Hashable

from ..registry import Registry

Key = Hashable

_POLICIES = Registry("policy", "policies")


class EvictionPolicy(ABC):
    """Base class of every eviction policy.

    Costs: ``insert``, ``access``, ``remove``, ``pin``, ``unpin`` and ``victim`` are O(1) or O(log n).
    """

    name: ClassVar[str] = "base"
    weighs_size: ClassVar[bool] = False  # True where ``size`` changes the policy's choices
    offline: ClassVar[bool] = False      # True where the policy needs the future (the fast replay only)

    @abstractmethod
    def insert(self, key: Key, size: int = 1) -> None:
        """``key`` (not resident) becomes resident and evictable, weighing ``size`` units."""

    @abstractmethod
    def access(self, key: Key) -> None:
        """A hit on resident ``key`` (pinned or not)."""

    @abstractmethod
    def remove(self, key: Key) -> None:
        """Resident ``key`` leaves the cache other than as a victim (freed, invalidated)."""

    @abstractmethod
    def victim(self) -> Key:
        """Choose an unpinned resident key, make it non-resident and return it.

        Raises ``LookupError`` when no key is evictable."""

    @abstractmethod
    def pin(self, key: Key) -> None:
        """Resident ``key`` is in use: it is not a victim until ``unpin``."""

    @abstractmethod
    def unpin(self, key: Key) -> None:
        """Pinned ``key`` is evictable again."""

    @abstractmethod
    def __contains__(self, key: Key) -> bool:
        """Whether ``key`` is resident."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of resident keys, pinned or not."""

    @property
    @abstractmethod
    def num_evictable(self) -> int:
        """Number of resident, unpinned keys."""

    # Optional hooks. The defaults are built from the methods above; policies override them with fused
    # versions because the replay engines call them once per block reference.

    def access_and_pin(self, key: Key) -> None:
        """A hit on resident ``key`` by a sequence that now holds it: ``access`` then ``pin``."""
        self.access(key)
        self.pin(key)

    def insert_and_pin(self, key: Key, size: int = 1) -> None:
        """``key`` becomes resident already held by a sequence: ``insert`` then ``pin``."""
        self.insert(key, size)
        self.pin(key)

    def unpin_many(self, keys) -> None:
        """``unpin`` each of ``keys`` in the order given (the first becomes evictable first)."""
        for key in keys:
            self.unpin(key)

    def on_request(self, keys, num_hit: int, request=None) -> None:
        """Context a KV cache knows and a generic cache does not, given before a request's blocks are
        accessed or inserted: ``keys`` its block keys in prefix order, ``num_hit`` how many leading
        ones are resident, ``request`` the record (or None). Policies that ignore it need not override."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(resident={len(self)}, evictable={self.num_evictable})"


def register_policy(name: str, *aliases: str) -> Callable[[type[EvictionPolicy]], type[EvictionPolicy]]:
    """Class decorator: register a policy under ``name`` (and ``aliases``) for ``make_policy``."""
    return _POLICIES.register(name, *aliases)


def available_policies(include_aliases: bool = False) -> list[str]:
    return _POLICIES.names(include_aliases)


def offline_policies() -> list[str]:
    """Registered policies that need the trace's future (``offline = True``), such as Belady's."""
    return [n for n in available_policies() if _POLICIES.factories[n].offline]


def canonical_name(name: str) -> str:
    """The registered name for ``name`` or one of its aliases; ValueError listing the valid names."""
    return _POLICIES.canonical(name)


def make_policy(name: str, **kwargs) -> EvictionPolicy:
    """Instantiate a registered policy by name or alias (``kwargs`` go to its constructor)."""
    return _POLICIES.make(name, **kwargs)
