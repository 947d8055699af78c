"""The request record shared by trace loaders, synthetic generators and the replay engines."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Request:
    """One inference request.

    ``hash_ids``: the prompt as prefix-chained block hashes, one per ``block_tokens`` tokens (equal ids
    mean equal prefixes, as in the Mooncake traces). ``token_ids``: the prompt tokens, where known.
    ``model``: the pool (model preset) that serves it, for mixed workloads. ``stop_reason``: why this
    request's output ended, where the trace says (``"tool_use"``: the client sends a follow-up once its tool
    has run; ``"end_turn"``: it waits for the user). ``parent_id``: for a request of a sub-agent run, the
    ``request_id`` of the request that launched the run.
    """

    request_id: int
    arrival_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...] = ()
    block_tokens: int = 512
    token_ids: tuple[int, ...] | None = None
    session_id: int | None = None
    turn: int | None = None
    model: str | None = None
    meta: dict = field(default_factory=dict)
    stop_reason: str | None = None
    parent_id: int | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.hash_ids)
