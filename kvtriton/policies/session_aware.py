"""SESSION_AWARE: evict the blocks of the session least likely to send its next request soon.

What a serving system sees online, and a generic cache does not: the session (conversation) a request
belongs to, the stop reason of its output (``tool_use``: an agent calls back within seconds once its tool
has run; ``end_turn``: a person answers in minutes, or never), how long the server took to answer it
(``meta["api_time"]``, when the record has it), when it arrived and the gap before it.
A session's next request reuses its whole cached prefix, so every block of a session is worth about the
same: the chance that the session returns before the block would be evicted. The policy ranks the
sessions holding evictable blocks by :class:`~kvtriton.policies.session_return.ReturnModel`'s score
(an online, censoring-aware estimate of the return probability given the stop reason, the session's
pace and how long it has been idle) and evicts from the lowest-ranked one, its latest prompt's blocks
from the tail, so that what stays is a prefix the session's next request can hit. Before any of that go
the stale blocks of every session: cached by an earlier request and dropped by the session's latest
prompt (its context changed), so that session will not hit them again; oldest first. Ties go to the session idle longest.

Requests come from ``on_request`` (the replay engines and the pool pass the record): ``session_id``,
``arrival_s`` and ``stop_reason`` (the stop reason of that request's output: the replay completes a
request at its arrival; in the device replay its blocks are pinned until it completes, so the policy
acts on the stop reason only once it is known). A trace without sessions (the Mooncake traces) carries
none of this signal: the first request decides, and without a ``session_id`` the policy runs
``fallback`` (default ``prefix_aware``) unchanged.

Costs: O(1) per block reference; a ranking of the sessions holding evictable blocks, O(S log S), once per
request that needs a victim.
"""

from __future__ import annotations

from collections import OrderedDict

from ._util import already_resident, check_capacity, check_size, empty, not_pinned, not_resident
from .base import EvictionPolicy, Key, make_policy, register_policy
from .session_return import ReturnModel


@register_policy("session_aware")
class SessionAwarePolicy(EvictionPolicy):
    """See the module docstring. ``model_kwargs`` go to :class:`ReturnModel` (horizons, weights,
    pace_edges, service_edges, prior); ``fallback``: the policy for traces without session ids."""

    def __init__(self, capacity: int | None = None, fallback: str = "prefix_aware", **model_kwargs):
        self._capacity = check_capacity(capacity)
        if fallback == "session_aware":
            raise ValueError("fallback must be another registered policy, not session_aware itself")
        self._fallback_name = fallback
        self._make_fallback()  # ValueError listing the valid names, before any work
        self.model = ReturnModel(**model_kwargs)
        self._inner: EvictionPolicy | None = None   # the fallback, once a request without session came
        self._mode: str | None = None               # "session" or "fallback", fixed by the first request
        self._owner: dict = {}       # resident key -> session
        self._pins: dict = {}        # pinned key -> count
        self._evq: dict = {}         # session -> OrderedDict of its evictable keys, first evicted first
        self._stale: OrderedDict = OrderedDict()  # evictable keys their session's latest prompt dropped
        self._n_evictable = 0
        self._now = 0.0
        self._current = None         # session of the request being served
        self._rank: list | None = None
        self._rank_pos = 0

    # ------------------------------------------------------------------ mode
    def _make_fallback(self) -> EvictionPolicy:
        try:
            return make_policy(self._fallback_name, capacity=self._capacity)
        except TypeError:      # a policy without a capacity argument
            return make_policy(self._fallback_name)

    def _start(self, request) -> None:
        sid = getattr(request, "session_id", None) if request is not None else None
        self._mode = "session" if sid is not None else "fallback"
        if self._mode == "fallback":
            self._inner = self._make_fallback()

    def _check_start(self) -> None:
        if self._mode is None:
            self._start(None)

    def on_request(self, keys, num_hit: int, request=None) -> None:
        if self._mode is None:
            self._start(request)
        if self._mode == "fallback":
            return self._inner.on_request(keys, num_hit, request)
        sid = getattr(request, "session_id", None) if request is not None else None
        if sid is None:
            raise ValueError("session_aware: a request without session_id in a trace whose first request had "
                             "one; give every request a session_id, or none")
        now = float(request.arrival_s)
        self._now = max(self._now, now)
        self._current = sid
        meta = getattr(request, "meta", None) or {}
        service = meta.get("api_time")
        service = float(service) if isinstance(service, (int, float)) and service >= 0 else None
        self.model.observe(sid, self._now, getattr(request, "stop_reason", None), service)
        self._mark_stale(sid, keys)
        self._rank = None

    def _mark_stale(self, sid, keys) -> None:
        """The session's evictable keys that its new prompt ``keys`` does not hold will not be hit again
        by it (its context changed): they go to the stale queue, evicted before any ranked session."""
        q = self._evq.get(sid)
        if not q:
            return
        ks = keys if isinstance(keys, (set, frozenset, dict)) else set(keys)
        dropped = [k for k in q if k not in ks]
        for k in dropped:
            del q[k]
            self._stale[k] = None

    # ------------------------------------------------------------------ the policy interface
    def insert(self, key: Key, size: int = 1) -> None:
        self._check_start()
        if self._mode == "fallback":
            return self._inner.insert(key, size)
        self.insert_and_pin(key, size)
        self.unpin_many((key,))

    def insert_and_pin(self, key: Key, size: int = 1) -> None:
        self._check_start()
        if self._mode == "fallback":
            return self._inner.insert_and_pin(key, size)
        if key in self._owner:
            raise already_resident(key)
        check_size(size)
        self._owner[key] = self._current
        self._pins[key] = 1

    def access(self, key: Key) -> None:
        self._check_start()
        if self._mode == "fallback":
            return self._inner.access(key)
        self.access_and_pin(key)
        self.unpin_many((key,))

    def access_and_pin(self, key: Key) -> None:
        self._check_start()
        if self._mode == "fallback":
            return self._inner.access_and_pin(key)
        n = self._pins.get(key)
        if n is not None:
            self._pins[key] = n + 1
            self._owner[key] = self._current
            return
        owner = self._owner.get(key, _MISSING)
        if owner is _MISSING:
            raise not_resident(key)
        self._take_evictable(owner, key)
        self._owner[key] = self._current
        self._pins[key] = 1

    def _take_evictable(self, owner, key) -> None:
        """``key`` (evictable, of ``owner``) leaves the evictable keys."""
        q = self._evq.get(owner)
        if q is not None and key in q:
            del q[key]
        else:
            del self._stale[key]
        self._n_evictable -= 1

    def pin(self, key: Key) -> None:
        self._check_start()
        if self._mode == "fallback":
            return self._inner.pin(key)
        n = self._pins.get(key)
        if n is not None:
            self._pins[key] = n + 1
        elif key in self._owner:
            self._take_evictable(self._owner[key], key)
            self._pins[key] = 1
        else:
            raise not_resident(key)

    def unpin(self, key: Key) -> None:
        self.unpin_many((key,))

    def unpin_many(self, keys) -> None:
        self._check_start()
        if self._mode == "fallback":
            return self._inner.unpin_many(keys)
        pins, owner, evq = self._pins, self._owner, self._evq
        for key in keys:
            n = pins.get(key)
            if n is None:
                raise not_pinned(key)
            if n > 1:
                pins[key] = n - 1
                continue
            del pins[key]
            s = owner[key]
            q = evq.get(s)
            if q is None:
                q = evq[s] = OrderedDict()
            q[key] = None
            self._n_evictable += 1

    def remove(self, key: Key) -> None:
        self._check_start()
        if self._mode == "fallback":
            return self._inner.remove(key)
        owner = self._owner.pop(key, _MISSING)
        if owner is _MISSING:
            raise not_resident(key)
        if self._pins.pop(key, None) is None:
            self._take_evictable(owner, key)

    def victim(self) -> Key:
        self._check_start()
        if self._mode == "fallback":
            return self._inner.victim()
        if not self._n_evictable:
            raise empty()
        if self._stale:
            key, _ = self._stale.popitem(last=False)
            self._n_evictable -= 1
            del self._owner[key]
            return key
        while True:
            if self._rank is None or self._rank_pos >= len(self._rank):
                self._rank = self._ranking()
                self._rank_pos = 0
            s = self._rank[self._rank_pos]
            q = self._evq.get(s)
            if q:
                key, _ = q.popitem(last=False)
                self._n_evictable -= 1
                del self._owner[key]
                return key
            self._rank_pos += 1

    def _ranking(self) -> list:
        """Sessions holding evictable keys, lowest score first; the current session's last."""
        model, now, cur = self.model, self._now, self._current
        live = [s for s, q in self._evq.items() if q]
        for s in [s for s, q in self._evq.items() if not q]:
            del self._evq[s]
        others = [s for s in live if s != cur]
        others.sort(key=lambda s: (model.score(s, now), model.last[s]) if s in model.last else (-1.0, -1.0))
        if cur in self._evq:
            others.append(cur)
        return others

    def __contains__(self, key: Key) -> bool:
        if self._mode == "fallback":
            return key in self._inner
        return key in self._owner

    def __len__(self) -> int:
        if self._mode == "fallback":
            return len(self._inner)
        return len(self._owner)

    @property
    def num_evictable(self) -> int:
        if self._mode == "fallback":
            return self._inner.num_evictable
        return self._n_evictable

    @property
    def mode(self) -> str | None:
        """``"session"``, ``"fallback"`` (no session ids: the ``fallback`` policy decides) or None
        (no request yet)."""
        return self._mode

    def learned(self, horizons=(30.0, 600.0)) -> dict:
        """What the model learned: P(return within h | stop reason) for a session just served, per h."""
        out = {}
        for stop in ("tool_use", "end_turn", None):
            for h in horizons:
                out[f"p_return_{int(h)}s_{stop or 'none'}"] = self.model.return_probability(stop, h)
        return out


_MISSING = object()
