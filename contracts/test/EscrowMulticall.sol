// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

/// @title EscrowMulticall
/// @notice Makes several calls to one target in one transaction, as a smart account or a router would:
///         the escrow's reentrancy guard must be clear again between them.
contract EscrowMulticall {
    /// @notice Call `index` reverted with `reason`.
    error CallFailed(uint256 index, bytes reason);

    /// @notice Calls `target` with each of `calls` in order; reverts if any one reverts.
    /// @param target The contract called.
    /// @param calls The calldata of each call.
    /// @return results What each call returned.
    function multicall(address target, bytes[] calldata calls) external returns (bytes[] memory results) {
        results = new bytes[](calls.length);
        for (uint256 i; i < calls.length; ++i) {
            (bool ok, bytes memory result) = target.call(calls[i]);
            if (!ok) revert CallFailed(i, result);
            results[i] = result;
        }
    }
}
