// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

/// @title TestUSDC
/// @notice A USDC-like ERC-20 with ERC-3009 transfer authorizations, for tests and local demos.
/// @dev Mirrors the parts of Circle's FiatToken v2.2 that x402 relies on: the EIP-712 domain
///      (name, version, chain id, contract), `transferWithAuthorization`,
///      `receiveWithAuthorization` and `cancelAuthorization` in both signature encodings,
///      and `authorizationState`. Its (v, r, s) forms check an ECDSA signature only, as
///      FiatToken did before v2.2; its bytes forms also accept an EIP-1271 wallet's, as v2.2
///      does in both forms. Anyone may mint: it is worthless by design.
///      Transfers go through the virtual `_transfer` so that hostile tokens can override it.
contract TestUSDC {
    /// @notice EIP-712 type hash of a TransferWithAuthorization.
    bytes32 public constant TRANSFER_WITH_AUTHORIZATION_TYPEHASH = keccak256(
        "TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
    );
    /// @notice EIP-712 type hash of a ReceiveWithAuthorization.
    bytes32 public constant RECEIVE_WITH_AUTHORIZATION_TYPEHASH = keccak256(
        "ReceiveWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
    );
    /// @notice EIP-712 type hash of a CancelAuthorization.
    bytes32 public constant CANCEL_AUTHORIZATION_TYPEHASH =
        keccak256("CancelAuthorization(address authorizer,bytes32 nonce)");

    /// @notice EIP-1271 `isValidSignature(bytes32,bytes)` selector, returned by a wallet that accepts a signature.
    bytes4 public constant EIP1271_MAGIC_VALUE = 0x1626ba7e;

    /// @notice EIP-712 domain name.
    string public name;
    /// @notice EIP-712 domain version.
    string public version;
    /// @notice Token symbol.
    string public symbol;
    /// @notice Decimals, as USDC.
    uint8 public constant decimals = 6;
    /// @notice Total minted.
    uint256 public totalSupply;
    /// @notice Balances.
    mapping(address account => uint256) public balanceOf;
    /// @notice ERC-20 allowances.
    mapping(address owner => mapping(address spender => uint256)) public allowance;
    /// @dev Used or cancelled authorization nonces, per authorizer.
    mapping(address authorizer => mapping(bytes32 nonce => bool)) private _authorizationStates;

    /// @notice ERC-20 transfer.
    event Transfer(address indexed from, address indexed to, uint256 value);
    /// @notice ERC-20 approval.
    event Approval(address indexed owner, address indexed spender, uint256 value);
    /// @notice An authorization was used.
    event AuthorizationUsed(address indexed authorizer, bytes32 indexed nonce);
    /// @notice An authorization was cancelled.
    event AuthorizationCanceled(address indexed authorizer, bytes32 indexed nonce);

    /// @notice The authorization is not valid yet.
    error AuthorizationNotYetValid(uint256 validAfter, uint256 now_);
    /// @notice The authorization has expired.
    error AuthorizationExpired(uint256 validBefore, uint256 now_);
    /// @notice The nonce was used or cancelled.
    error AuthorizationUsedOrCanceled(address authorizer, bytes32 nonce);
    /// @notice The signature is not the authorizer's.
    error InvalidSignature(address authorizer);
    /// @notice `receiveWithAuthorization` called by someone other than the payee.
    error CallerMustBePayee(address caller, address payee);
    /// @notice Not enough balance.
    error InsufficientBalance(address account, uint256 balance, uint256 needed);
    /// @notice Not enough allowance.
    error InsufficientAllowance(address owner, address spender, uint256 allowance, uint256 needed);

    /// @param name_ EIP-712 domain name ("USDC" on Base Sepolia).
    /// @param version_ EIP-712 domain version ("2").
    constructor(string memory name_, string memory version_) {
        name = name_;
        version = version_;
        symbol = "USDC";
    }

    /// @notice The EIP-712 domain separator, recomputed so that it follows the chain id.
    function DOMAIN_SEPARATOR() public view returns (bytes32) {
        return keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak256(bytes(name)),
                keccak256(bytes(version)),
                block.chainid,
                address(this)
            )
        );
    }

    /// @notice Mints to anyone; test token only.
    function mint(address to, uint256 value) external {
        totalSupply += value;
        balanceOf[to] += value;
        emit Transfer(address(0), to, value);
    }

    /// @notice ERC-20 transfer.
    function transfer(address to, uint256 value) external virtual returns (bool) {
        _transfer(msg.sender, to, value);
        return true;
    }

    /// @notice ERC-20 transferFrom.
    function transferFrom(address from, address to, uint256 value) external returns (bool) {
        uint256 allowed = allowance[from][msg.sender];
        if (allowed != type(uint256).max) {
            if (allowed < value) revert InsufficientAllowance(from, msg.sender, allowed, value);
            allowance[from][msg.sender] = allowed - value;
        }
        _transfer(from, to, value);
        return true;
    }

    /// @notice ERC-20 approve.
    function approve(address spender, uint256 value) external returns (bool) {
        allowance[msg.sender][spender] = value;
        emit Approval(msg.sender, spender, value);
        return true;
    }

    /// @notice Whether `authorizer` has used or cancelled `nonce`.
    function authorizationState(address authorizer, bytes32 nonce) external view returns (bool) {
        return _authorizationStates[authorizer][nonce];
    }

    /// @notice ERC-3009 transfer authorised by `from`'s (v, r, s) signature; anyone may submit it.
    function transferWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external {
        _useAuthorization(
            TRANSFER_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce, abi.encodePacked(r, s, v), false
        );
        _transfer(from, to, value);
    }

    /// @notice ERC-3009 transfer authorised by `from`'s signature bytes; anyone may submit it.
    function transferWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes calldata signature
    ) external {
        _useAuthorization(
            TRANSFER_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce, signature, true
        );
        _transfer(from, to, value);
    }

    /// @notice ERC-3009 receive: as transferWithAuthorization, but only the payee may submit it.
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
    ) external {
        if (to != msg.sender) revert CallerMustBePayee(msg.sender, to);
        _useAuthorization(
            RECEIVE_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce, abi.encodePacked(r, s, v), false
        );
        _transfer(from, to, value);
    }

    /// @notice ERC-3009 receive with the signature as bytes.
    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes calldata signature
    ) external {
        if (to != msg.sender) revert CallerMustBePayee(msg.sender, to);
        _useAuthorization(
            RECEIVE_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce, signature, true
        );
        _transfer(from, to, value);
    }

    /// @notice Cancels an unused authorization, signed (v, r, s) by its authorizer.
    function cancelAuthorization(address authorizer, bytes32 nonce, uint8 v, bytes32 r, bytes32 s) external {
        _cancel(authorizer, nonce, abi.encodePacked(r, s, v), false);
    }

    /// @notice Cancels an unused authorization, signed by its authorizer.
    function cancelAuthorization(address authorizer, bytes32 nonce, bytes calldata signature) external {
        _cancel(authorizer, nonce, signature, true);
    }

    function _cancel(address authorizer, bytes32 nonce, bytes memory signature, bool wallets) private {
        if (_authorizationStates[authorizer][nonce]) revert AuthorizationUsedOrCanceled(authorizer, nonce);
        _verify(authorizer, keccak256(abi.encode(CANCEL_AUTHORIZATION_TYPEHASH, authorizer, nonce)), signature, wallets);
        _authorizationStates[authorizer][nonce] = true;
        emit AuthorizationCanceled(authorizer, nonce);
    }

    function _useAuthorization(
        bytes32 typehash,
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes memory signature,
        bool wallets
    ) private {
        if (block.timestamp <= validAfter) revert AuthorizationNotYetValid(validAfter, block.timestamp);
        if (block.timestamp >= validBefore) revert AuthorizationExpired(validBefore, block.timestamp);
        if (_authorizationStates[from][nonce]) revert AuthorizationUsedOrCanceled(from, nonce);
        _verify(from, keccak256(abi.encode(typehash, from, to, value, validAfter, validBefore, nonce)), signature, wallets);
        _authorizationStates[from][nonce] = true;
        emit AuthorizationUsed(from, nonce);
    }

    /// @dev An EOA's (r, s, v) signature, with the low-s rule against malleability; with `wallets`, a
    ///      contract signer's EIP-1271 `isValidSignature` instead, as FiatToken v2.2's SignatureChecker.
    function _verify(address signer, bytes32 structHash, bytes memory signature, bool wallets) private view {
        bytes32 digest = keccak256(abi.encodePacked("\x19\x01", DOMAIN_SEPARATOR(), structHash));
        if (wallets && signer.code.length != 0) {
            (bool ok, bytes memory answer) =
                signer.staticcall(abi.encodeWithSelector(EIP1271_MAGIC_VALUE, digest, signature));
            if (!ok || answer.length < 32 || abi.decode(answer, (bytes4)) != EIP1271_MAGIC_VALUE) {
                revert InvalidSignature(signer);
            }
            return;
        }
        if (signature.length != 65) revert InvalidSignature(signer);
        bytes32 r;
        bytes32 s;
        uint8 v;
        assembly {
            r := mload(add(signature, 0x20))
            s := mload(add(signature, 0x40))
            v := byte(0, mload(add(signature, 0x60)))
        }
        if (uint256(s) > 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0) revert InvalidSignature(signer);
        address recovered = ecrecover(digest, v, r, s);
        if (recovered == address(0) || recovered != signer) revert InvalidSignature(signer);
    }

    /// @dev Moves `value` from `from` to `to`; hostile tokens override it.
    function _transfer(address from, address to, uint256 value) internal virtual {
        uint256 balance = balanceOf[from];
        if (balance < value) revert InsufficientBalance(from, balance, value);
        unchecked {
            balanceOf[from] = balance - value;
        }
        balanceOf[to] += value;
        emit Transfer(from, to, value);
    }
}
