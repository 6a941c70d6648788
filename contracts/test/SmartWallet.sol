// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

/// @title SmartWallet
/// @notice A minimal EIP-1271 wallet: a signature is valid if its owner's key signed the digest. It takes the
///         owner's 65-byte (r, s, v) signature as is, or behind a one-byte scheme prefix (66 bytes), as many
///         wallets frame theirs.
contract SmartWallet {
    /// @notice The EOA whose signatures the wallet accepts.
    address public immutable owner;

    /// @param owner_ The EOA whose signatures the wallet accepts.
    constructor(address owner_) {
        owner = owner_;
    }

    /// @notice EIP-1271: `0x1626ba7e` if the owner signed `digest`, else `0xffffffff`.
    /// @param digest The signed digest.
    /// @param signature (r, s, v), optionally behind one prefix byte.
    /// @return magic The EIP-1271 answer.
    function isValidSignature(bytes32 digest, bytes calldata signature) external view returns (bytes4 magic) {
        bytes calldata sig = signature.length == 66 ? signature[1:] : signature;
        if (sig.length != 65) return 0xffffffff;
        bytes32 r = bytes32(sig[0:32]);
        bytes32 s = bytes32(sig[32:64]);
        uint8 v = uint8(sig[64]);
        address signer = ecrecover(digest, v, r, s);
        return signer != address(0) && signer == owner ? bytes4(0x1626ba7e) : bytes4(0xffffffff);
    }
}
