"""The session-state bound: session reconstruction on a hand-made trace, and an end-to-end run."""

import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from bound_session_state import SessionStatePolicy, return_table, sessions  # noqa: E402
from kvtriton.replay import simulate  # noqa: E402
from kvtriton.workloads import Request  # noqa: E402


def _req(i, t, ids, tokens=None):
    return Request(request_id=i, arrival_s=t, input_length=tokens or 512 * len(ids), output_length=8,
                   hash_ids=tuple(ids))


def test_sessions_follow_prefix_chains_past_the_shared_block():
    reqs = [_req(0, 0.0, [0, 1, 2]),          # session A, turn 0
            _req(1, 5.0, [0, 7]),             # only the universal block: a new session
            _req(2, 10.0, [0, 1, 2, 3]),      # A, turn 1
            _req(3, 40.0, [0, 1, 2, 3, 4]),   # A, turn 2
            _req(4, 41.0, [0, 7, 8])]         # B (request 1), turn 1
    parent, depth, gap = sessions(reqs)
    assert parent == [-1, -1, 0, 2, 1]
    assert depth == [0, 0, 1, 2, 1]
    assert gap[0] == 10.0 and gap[2] == 30.0 and gap[1] == 36.0
    assert gap[3] == math.inf and gap[4] == math.inf
    table = return_table(reqs, depth, gap)
    assert table[0][0] == 1.0          # both first turns got a follow-up
    assert table[2][0] == 0.0          # the third turn did not


def test_oracle_policy_beats_lru_and_keeps_the_cache_consistent():
    # Two sessions alternate with one-off requests; a cache of 6 blocks.
    reqs, t = [], 0.0
    for turn in range(4):
        for s in range(2):
            base = [0, 100 + s]
            reqs.append(_req(len(reqs), t, base + [1000 * (s + 1) + k for k in range(turn + 1)], 512 * (turn + 3) - 10))
            t += 1.0
            reqs.append(_req(len(reqs), t, [0, 5000 + len(reqs), 6000 + len(reqs)]))
            t += 1.0
    parent, depth, gap = sessions(reqs)
    follows = [int(g < math.inf) for g in gap]
    pol = SessionStatePolicy(reqs, depth, lambda i, age: (follows[i], -age), bucket=follows)
    oracle = simulate(reqs, pol, 6)["hit_rate"]
    assert len(pol) <= 6 and pol.num_evictable == len(pol)
    assert oracle > simulate(reqs, "lru", 6)["hit_rate"]


def test_bound_script_runs(traces_dir):
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "bound_session_state.py"), "--traces",
                           str(traces_dir), "--requests", "1500", "--capacities", "1500"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bound: turn + age, P(ever)" in proc.stdout and "oracle: told which sessions continue" in proc.stdout
