"""What web3.py, requests and the socket layer raise, turned into the package's typed chain errors.

web3.py lets its transport's exceptions through untouched (requests' ConnectionError,
InvalidSchema, ReadTimeout) and adds its own (ContractLogicError, BadFunctionCallOutput,
Web3RPCError). A role that promises typed errors reads the chain inside `typed_chain_errors`:

    with typed_chain_errors("reading the token's name"):
        name = token.contract.functions.name().call()

and gets a ContractRevert for a revert, an RpcError for everything else, each naming what it was doing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from web3.exceptions import BadFunctionCallOutput, Web3Exception

from escrow_py.chain import rpc
from escrow_py.chain.tx import revert_from_exception, revert_or_node_error
from escrow_py.protocol.errors import ChainError, ContractRevert, EscrowError, RpcError, RpcTimeout

# What a chain read can raise besides our own errors: transport errors are OSError (requests'
# RequestException included, InvalidSchema too), web3's own derive from Web3Exception, and web3
# still raises a bare ValueError for some malformed answers.
CHAIN_FAILURES: tuple[type[Exception], ...] = (OSError, Web3Exception, ValueError)


def as_chain_error(exc: Exception, what: str) -> ChainError:
    """The typed form of `exc`, raised while `what`: ContractRevert for a revert, RpcError otherwise."""
    if isinstance(exc, ChainError):
        return exc
    revert = revert_from_exception(exc)
    if revert is not None:
        return revert
    if isinstance(exc, BadFunctionCallOutput):
        return RpcError(f"{what}: the call returned no data (no contract at that address, or not that function)")
    if isinstance(exc, OSError):
        return RpcError(f"{what}: the node could not be reached ({type(exc).__name__}: {exc})")
    return RpcError(f"{what}: {type(exc).__name__}: {exc}")


@contextmanager
def typed_chain_errors(what: str) -> Iterator[None]:
    """Re-raise any chain failure inside the block as a ChainError (the original as its __cause__)."""
    try:
        yield
    except rpc.NodeError as exc:
        failure = revert_or_node_error(exc)
        if isinstance(failure, ContractRevert):  # a raw read that reverted: the same error as web3's revert
            raise failure from exc
        raise
    except EscrowError as exc:
        if type(exc) in (RpcError, RpcTimeout):
            # The transport's own (rpc.DeadlineHTTPProvider) names the JSON-RPC method, not what it was for.
            raise type(exc)(f"{what}: {exc}") from exc
        raise
    except CHAIN_FAILURES as exc:
        raise as_chain_error(exc, what) from exc
