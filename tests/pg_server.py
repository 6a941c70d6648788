"""The test session's throwaway PostgreSQL server: the benchmarks' own (escrow_devtools.bench.postgres)."""

from escrow_devtools.bench.postgres import PG_BIN, PostgresServer

__all__ = ["PG_BIN", "PostgresServer"]
