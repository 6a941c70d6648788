// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {X402Escrow} from "../X402Escrow.sol";

/// @title LookAlikeEscrow
/// @notice Tests only. Answers every function of X402Escrow's ABI exactly as the escrow does, so
///         nothing a buyer can call tells it apart; but its deployer takes whatever it holds
///         through a fallback that no published interface shows.
/// @dev The point: a buyer must judge an escrow by its runtime code, not by its ABI or its answers.
contract LookAlikeEscrow is X402Escrow {
    /// @notice Only the deployer may use the back door.
    /// @param caller Who tried.
    error NotTheDeployer(address caller);

    /// @dev Embedded in the runtime code at deployment, so the code differs from X402Escrow's.
    address private immutable _deployer = msg.sender;

    /// @notice Calldata `abi.encode(token, to, amount)` from the deployer moves held funds to `to`.
    fallback() external {
        if (msg.sender != _deployer) revert NotTheDeployer(msg.sender);
        (address token, address to, uint256 amount) = abi.decode(msg.data, (address, address, uint256));
        (bool ok, bytes memory reason) = token.call(abi.encodeWithSignature("transfer(address,uint256)", to, amount));
        if (!ok) {
            assembly {
                revert(add(reason, 0x20), mload(reason))
            }
        }
    }
}
