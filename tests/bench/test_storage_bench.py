"""The storage benchmark runs end to end on both engines (its own throwaway PostgreSQL) and prints every query."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

EXPECTED = {
    "keeper": {"due (per cycle)", "held count (per cycle with changes)", "tracked attempts (per cycle)",
               "checkpoint (per cycle)", "block hash (per cycle)", "claim 100 (per batch)"},
    "buyer": {"budget check (per paid request)", "payment by id (per paid request)",
              "unfinished payments (per recovery)", "unconfirmed ledger rows (per recovery)"},
    "seller": {"payment by id (per paid request)", "claim taken (per paid request)",
               "20 claims renewed (per heartbeat, a third of a lease)",
               "nonce allocated (per transaction)", "transactions of an intent (per transaction)",
               "buyer's serve-first exposure (per serve-first request)", "poster lease (per pass)",
               "refunds pending (per pass)", "expire pending (per pass)", "pending deliveries (per pass)",
               "posted, not final (per pass)", "unpaid serve-first total (per pass)", "settlements due (per pass)",
               "settled, not final (per pass)"},
}  # fmt: skip


def test_bench_storage_json_prints_each_query_on_both_engines(
    bench: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    out = bench("storage", "--rows", "3000", "--repeat", "5", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["rows"] == 3000 and set(result["engines"]) == {"sqlite", "postgresql"}
    slow = []
    for engine, roles in result["engines"].items():
        assert roles["keeper"]["due_rows"] == 3  # the fill's open escrows past their deadline, found
        for role, names in EXPECTED.items():
            queries = roles[role]["queries"]
            assert set(queries) == names, (engine, role)
            for name, q in queries.items():
                assert 0 < q["p50_ms"] <= q["p95_ms"] <= q["max_ms"], (engine, name, q)
                assert q["cpu_ms"] >= 0, (engine, name, q)  # this process's and the server's CPU per run
                if q["p50_ms"] >= result["target_p50_ms"]:
                    slow.append(f"{engine} {role}: {name} p50 {q['p50_ms']} ms")
    assert result["over_target"] == slow and result["met"] == (not slow)
