"""Run Slither on contracts/ and fail on any finding that slither.triage.toml does not explain.

    .venv/bin/python scripts/slither_check.py          # make lint runs it

Slither compiles through the solc-js wrapper, the same compiler the shipped artifacts come from:
`slither contracts/ --solc scripts/solc-js.cjs --solc-standard-json`. Every finding it reports
must have an entry in slither.triage.toml (the detector, where it is, and why it is accepted); a
new finding fails the run, and so does an entry that no longer matches any finding, so the file
stays the exact list of what was accepted and why.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRIAGE = REPO / "slither.triage.toml"
SLITHER = Path(sys.executable).parent / "slither"


def findings() -> set[tuple[str, str]]:
    """(detector, where) of every finding; `where` is the element as Slither names it, without line numbers."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "slither.json"
        command = [
            str(SLITHER), "contracts/",
            "--solc", "scripts/solc-js.cjs", "--solc-standard-json",
            "--json", str(report),
        ]  # fmt: skip
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
        if not report.is_file():
            sys.exit(f"slither produced no report (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
        data = json.loads(report.read_text())
    if not data.get("success"):
        sys.exit(f"slither failed: {data.get('error')}")
    found = set()
    for result in data["results"].get("detectors", []):
        where = result["description"].split(" (", 1)[0].strip()
        found.add((result["check"], where))
    return found


def triaged() -> dict[tuple[str, str], str]:
    """(detector, where) -> reason, from slither.triage.toml."""
    entries = tomllib.loads(TRIAGE.read_text()).get("finding", [])
    table = {}
    for entry in entries:
        reason = str(entry.get("reason", "")).strip()
        if not reason:
            sys.exit(f"{TRIAGE.name}: the entry {entry} gives no reason")
        table[(str(entry["detector"]), str(entry["where"]))] = reason
    return table


def main() -> int:
    found, accepted = findings(), triaged()
    new = sorted(found - set(accepted))
    stale = sorted(set(accepted) - found)
    for detector, where in new:
        print(f"NEW Slither finding, not triaged: [{detector}] {where}")
    for detector, where in stale:
        print(f"{TRIAGE.name} lists a finding Slither no longer reports: [{detector}] {where}")
    if new or stale:
        print(f"fix the code, or add/remove the entry in {TRIAGE.name} with the reason it is accepted")
        return 1
    print(f"slither: {len(found)} findings, every one triaged in {TRIAGE.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
