"""Keepers sharing a database index the same events: a keeper's stale view never undoes another's claims.

Found in a run of the 1,000-escrow test: two keepers started together, both read "no checkpoint",
one indexed and claimed a batch, then the other applied its (identical) events from the start
block. Its rewind deleted and re-inserted every deposit, the first keeper's claims with them, and
it sent a refund for escrows the first keeper had already sent. Both engines.
"""

from __future__ import annotations

from escrow_py.keeper._store import IndexedEvent, KeeperStore

ESCROW = "0x" + "ee" * 20
FIRST, SECOND = "0x" + "a1" * 20, "0x" + "b2" * 20
NOW = 1_000.0


def _deposit(n: int, block: int, block_hash: str = "0xaa") -> IndexedEvent:
    party = {"buyer": "0x" + "22" * 20, "seller": "0x" + "33" * 20, "token": "0x" + "44" * 20}
    return IndexedEvent("deposited", "0x" + f"{n:064x}", block, block_hash, "0x" + f"{n:064x}", encoded=bytes(256),
                        deadline=9, **party)  # fmt: skip


def _ids(*ns: int) -> set[bytes]:
    return {n.to_bytes(32, "big") for n in ns}


def test_a_keeper_applying_events_read_before_another_indexed_writes_nothing(db_url: str) -> None:
    first, second = KeeperStore(db_url), KeeperStore(db_url)
    events = [_deposit(n, block=5) for n in (1, 2, 3)]
    # Both keepers read "no checkpoint yet" and fetched the same events; the second one is quicker.
    assert second.apply(ESCROW, rewind_to=0, events=events, checkpoint=6, block_hashes=[(6, "0xcc")],
                        read_checkpoint=None) is True  # fmt: skip
    assert second.claim(ESCROW, SECOND, sorted(_ids(1, 2, 3)), NOW) == _ids(1, 2, 3)
    # The first keeper's apply is based on a checkpoint that is no longer the stored one.
    assert first.apply(ESCROW, rewind_to=0, events=events, checkpoint=6, block_hashes=[(6, "0xcc")],
                       read_checkpoint=None) is None  # fmt: skip
    assert first.checkpoint(ESCROW) == 6
    assert first.due(ESCROW, 2**40, set(), claimable_by=FIRST, now=NOW + 1) == []
    assert first.claim(ESCROW, FIRST, sorted(_ids(1, 2, 3)), NOW + 1) == set()


def test_a_reorg_keeps_the_claims_on_deposits_mined_again_and_drops_the_deposits_gone(db_url: str) -> None:
    store = KeeperStore(db_url)
    store.apply(ESCROW, rewind_to=0, events=[_deposit(1, 4), _deposit(2, 5), _deposit(3, 5)], checkpoint=6,
                block_hashes=[(4, "0xaa"), (5, "0xaa"), (6, "0xcc")], read_checkpoint=None)  # fmt: skip
    assert store.claim(ESCROW, SECOND, sorted(_ids(1, 2, 3)), NOW) == _ids(1, 2, 3)
    # Blocks 5 and 6 were replaced: deposit 3 is mined again in the new block 5, deposit 2 is gone.
    changed = store.apply(ESCROW, rewind_to=4, events=[_deposit(3, 5, "0xdd")], checkpoint=6,
                          block_hashes=[(5, "0xdd"), (6, "0xff")], read_checkpoint=6)  # fmt: skip
    assert changed is True
    assert {e.id for e in store.open_escrows(ESCROW)} == _ids(1, 3)
    # The claims of the deposits that stand are still the second keeper's: no other keeper may take them.
    assert store.claim(ESCROW, FIRST, sorted(_ids(1, 3)), NOW + 1) == set()
