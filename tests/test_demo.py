"""The README's main command runs end to end and proves the accounting."""

from __future__ import annotations

import subprocess
import sys


def test_demo_plays_every_story_and_accounts_for_every_token() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "escrow_py.cli", "demo"], capture_output=True, text=True, timeout=240, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "buyer verifies against the chain: True" in out.stdout
    assert "operator refunded at once: state REFUNDED" in out.stdout
    assert "returned the funds to the buyer: True" in out.stdout
    assert out.stdout.rstrip().endswith("every token accounted for")
