// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {TestUSDC} from "./TestUSDC.sol";

/// @title GasPriceCheckingToken
/// @notice A hostile token whose `transfer` succeeds in a simulation and reverts when mined: it refuses to run
///         at a non-zero gas price, and an `eth_call` or gas estimate without one runs at zero. Deposits
///         (`receiveWithAuthorization`) work, so escrows of it can be made; every payout of them reverts on chain.
///         Used to show that one such escrow cannot sink a keeper's batch of honest refunds.
contract GasPriceCheckingToken is TestUSDC {
    /// @notice A transfer in a transaction that pays for gas.
    /// @param gasPrice The transaction's gas price.
    error PaidTransferRefused(uint256 gasPrice);

    constructor() TestUSDC("USDC", "2") {}

    function transfer(address to, uint256 value) external override returns (bool) {
        if (tx.gasprice != 0) revert PaidTransferRefused(tx.gasprice);
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
