// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {TestUSDC} from "./TestUSDC.sol";

/// @title ReentrantToken
/// @notice On every transfer, calls a configured target with configured calldata: used to try
///         re-entering the escrow in the middle of a deposit, release or refund.
contract ReentrantToken is TestUSDC {
    /// @notice Contract to call back during a transfer (zero: none).
    address public hookTarget;
    /// @notice Calldata of the callback.
    bytes public hookData;
    /// @notice If true, a failed callback reverts the transfer; if false it is swallowed.
    bool public bubble;
    /// @notice Whether the last callback succeeded.
    bool public lastCallbackSucceeded;

    constructor() TestUSDC("USDC", "2") {}

    /// @notice Arms the callback.
    function setHook(address target, bytes calldata data, bool bubble_) external {
        hookTarget = target;
        hookData = data;
        bubble = bubble_;
    }

    function _transfer(address from, address to, uint256 value) internal override {
        super._transfer(from, to, value);
        if (hookTarget != address(0)) {
            (bool ok, bytes memory ret) = hookTarget.call(hookData);
            lastCallbackSucceeded = ok;
            if (!ok && bubble) {
                assembly {
                    revert(add(ret, 0x20), mload(ret))
                }
            }
        }
    }
}

/// @title FalseReturningToken
/// @notice `transfer` returns false and moves nothing; authorizations work, so deposits succeed
///         and every payout fails.
contract FalseReturningToken is TestUSDC {
    constructor() TestUSDC("USDC", "2") {}

    function transfer(address, uint256) external pure override returns (bool) {
        return false;
    }
}

/// @title BlockingToken
/// @notice Reverts every transfer to one chosen address, as a token blacklist would.
contract BlockingToken is TestUSDC {
    /// @notice The recipient that can receive nothing.
    address public blocked;

    /// @notice Transfer to a blocked recipient.
    error RecipientBlocked(address to);

    constructor() TestUSDC("USDC", "2") {}

    /// @notice Chooses the blocked recipient (zero: none).
    function setBlocked(address who) external {
        blocked = who;
    }

    function _transfer(address from, address to, uint256 value) internal override {
        if (to == blocked) revert RecipientBlocked(to);
        super._transfer(from, to, value);
    }
}
