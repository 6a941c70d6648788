// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {TestUSDC} from "./TestUSDC.sol";

/// @title NoReturnToken
/// @notice `transfer` moves the funds and returns no data at all, as USDT does on Ethereum: the escrow must accept it.
contract NoReturnToken is TestUSDC {
    constructor() TestUSDC("USDC", "2") {}

    function transfer(address to, uint256 value) external override returns (bool) {
        _transfer(msg.sender, to, value);
        assembly {
            return(0, 0)
        }
    }
}

/// @title ShortReturnToken
/// @notice `transfer` moves nothing and returns 31 zero bytes: too short to be a boolean, so the escrow must
///         refuse it, even when the memory it copies the answer into already ends in a 1 (an earlier
///         token's `true` in the same batch).
contract ShortReturnToken is TestUSDC {
    constructor() TestUSDC("USDC", "2") {}

    function transfer(address, uint256) external pure override returns (bool) {
        assembly {
            mstore(0, 0)
            return(0, 31)
        }
    }
}

/// @title SimulationOnlyToken
/// @notice `transfer` works in a simulation (`eth_call` and gas estimates run at gas price 0) and reverts once
///         mined: the trap a keeper must not re-send forever, and that must not sink the rest of a batch.
contract SimulationOnlyToken is TestUSDC {
    /// @notice A transfer mined at a non-zero gas price.
    error OnlyInSimulation(uint256 gasPrice);

    constructor() TestUSDC("USDC", "2") {}

    function transfer(address to, uint256 value) external override returns (bool) {
        if (tx.gasprice != 0) revert OnlyInSimulation(tx.gasprice);
        _transfer(msg.sender, to, value);
        return true;
    }
}

/// @title ReturnBombToken
/// @notice `transfer` reverts with 100,000 bytes of revert data. An escrow that copied a failed payout's return
///         data into its own memory would pay for that copy and its memory expansion on every such entry; the
///         escrow binds none of it, so the bomb costs the token's own frame (capped gas) and nothing more.
contract ReturnBombToken is TestUSDC {
    /// @notice Bytes of revert data each transfer returns.
    uint256 public constant BOMB_BYTES = 100_000;

    constructor() TestUSDC("USDC", "2") {}

    function transfer(address, uint256) external pure override returns (bool) {
        assembly {
            revert(0, 100000)
        }
    }
}
