// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

/// @title IERC3009
/// @notice The part of an ERC-3009 token (USDC, EURC) that the escrow calls.
/// @dev Both signature encodings of `receiveWithAuthorization` exist on USDC
///      v2.2: the (v, r, s) form on every FiatToken version, the `bytes` form
///      for smart-contract wallets (EIP-1271).
interface IERC3009 {
    /// @notice Pulls `value` from `from` to the caller, authorised by `from`'s signature over the nonce.
    /// @dev Reverts unless `to == msg.sender`, so nobody can front-run the pull into the escrow.
    /// @param from Payer; signer of the authorization.
    /// @param to Payee; must be the caller.
    /// @param value Amount in atomic units.
    /// @param validAfter The authorization is valid strictly after this unix time.
    /// @param validBefore The authorization is valid strictly before this unix time.
    /// @param nonce Unique per `from`; the escrow uses the escrow id.
    /// @param v Signature recovery byte.
    /// @param r Signature r.
    /// @param s Signature s.
    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external;

    /// @notice As above, with the signature as bytes (EOA or EIP-1271 wallet).
    /// @param from Payer; signer of the authorization.
    /// @param to Payee; must be the caller.
    /// @param value Amount in atomic units.
    /// @param validAfter The authorization is valid strictly after this unix time.
    /// @param validBefore The authorization is valid strictly before this unix time.
    /// @param nonce Unique per `from`; the escrow uses the escrow id.
    /// @param signature The payer's signature.
    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes calldata signature
    ) external;
}
