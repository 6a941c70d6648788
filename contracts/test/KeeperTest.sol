// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {TestUSDC} from "./TestUSDC.sol";

/// @title GasBurningToken
/// @notice A hostile token whose `transfer` works in a simulation and, once mined, burns all the gas it is
///         given: an `eth_call` or gas estimate runs at gas price zero, a mined transaction pays for gas.
///         X402Escrow caps the gas of each batch payout, so one such payout only fails (`PayoutFailed`); but
///         payouts to several distinct buyers outspend the gas a keeper budgets per entry, and the batch then
///         reverts when mined (`InsufficientGas`): the case a keeper must split without paying for it forever.
contract GasBurningToken is TestUSDC {
    constructor() TestUSDC("USDC", "2") {}

    function transfer(address to, uint256 value) external override returns (bool) {
        if (tx.gasprice != 0) {
            assembly {
                invalid() // consumes every unit of gas the call was given
            }
        }
        _transfer(msg.sender, to, value);
        return true;
    }
}

/// @notice The minting function of TestUSDC.
interface IMintable {
    /// @notice Mints `value` to `to`.
    function mint(address to, uint256 value) external;
}

/// @title BatchMinter
/// @notice Mints a test token to many accounts in one transaction: the keeper benchmark funds thousands of
///         distinct buyers with it.
contract BatchMinter {
    /// @notice Mints `value` of `token` to each of `to`.
    /// @param token A token anyone may mint (TestUSDC).
    /// @param to The recipients.
    /// @param value The amount each receives.
    function mintEach(IMintable token, address[] calldata to, uint256 value) external {
        for (uint256 i; i < to.length; ++i) {
            token.mint(to[i], value);
        }
    }
}
