"""Where the run's temporary files go: tmpfs with room when there is one, else pytest's default."""

from __future__ import annotations

import os
from pathlib import Path

from fixtures.temproot import MIN_FREE_BYTES, choose_temproot


def _choose(env: dict[str, str], mounted: set[str], free: int) -> str | None:
    return choose_temproot(env, ("/dev/shm",), lambda: mounted, lambda _: free)


def test_a_tmpfs_with_room_is_chosen() -> None:
    assert _choose({}, {"/dev/shm", "/run"}, MIN_FREE_BYTES) == "/dev/shm"


def test_a_small_or_missing_tmpfs_leaves_pytests_default() -> None:
    assert _choose({}, {"/dev/shm"}, MIN_FREE_BYTES - 1) is None  # a container's 64 MB /dev/shm
    assert _choose({}, {"/run"}, MIN_FREE_BYTES) is None  # /dev/shm on disk, or absent


def test_the_environment_overrides_the_choice() -> None:
    assert _choose({"X402_TEST_TEMPROOT": "/scratch"}, set(), 0) == "/scratch"
    assert _choose({"X402_TEST_TEMPROOT": ""}, {"/dev/shm"}, MIN_FREE_BYTES) is None
    assert _choose({"PYTEST_DEBUG_TEMPROOT": "/elsewhere"}, {"/dev/shm"}, MIN_FREE_BYTES) is None


def test_this_runs_temporary_files_are_under_the_chosen_root(tmp_path: Path) -> None:
    root = os.environ.get("PYTEST_DEBUG_TEMPROOT")
    if root:
        assert tmp_path.resolve().is_relative_to(Path(root).resolve())
