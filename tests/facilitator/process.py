"""`x402-escrow facilitator serve` as a real process: started, SIGKILLed and started again on one database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from fixtures.chain import Chain
from helpers import OPERATOR

from escrow_devtools.anvil import dev_private_key
from escrow_devtools.harness import wait_until_answering

CLI = str(Path(sys.executable).parent / "x402-escrow")


class FacilitatorProcess:
    def __init__(
        self, chain: Chain, db: Path | str, port: int, *flags: str, console_token: str | None = None,
        log_dir: Path | None = None,
    ) -> None:  # fmt: skip
        """`db`: a SQLite path (its log goes beside it) or a postgresql:// URL (the log goes in `log_dir`)."""
        self.command = [
            CLI, "facilitator", "serve", "--rpc", chain.node.url, "--escrow", chain.escrow.address,
            "--token", chain.token.address, "--database", str(db), "--port", str(port),
            "--poster-interval", "0.2", *flags,
        ]  # fmt: skip
        self.env = {**os.environ, "X402_ESCROW_PRIVATE_KEY": dev_private_key(OPERATOR)}
        if console_token:
            self.env["X402_ESCROW_CONSOLE_TOKEN"] = console_token
        self.url = f"http://127.0.0.1:{port}"
        if isinstance(db, Path):
            self.log = db.with_suffix(f".{port}.log")
        else:
            assert log_dir is not None, "a PostgreSQL facilitator needs a log_dir"
            self.log = log_dir / f"facilitator.{port}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        wait_until_answering(
            f"{self.url}/healthz",
            ready=lambda answer: answer.status_code == 200,
            process=self.process,
            output=self.log.read_text,
            timeout=120,
            what="the facilitator",
        )

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last poster pass."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
