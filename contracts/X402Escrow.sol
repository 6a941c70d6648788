// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {IERC3009} from "./interfaces/IERC3009.sol";

/// @title X402Escrow
/// @notice Holds an x402 payment until the seller commits to what it delivered, and gives it
///         back to the buyer once the deadline has passed without a delivery.
/// @dev One immutable contract: no owner, no admin, no fees, no upgrade path.
///      The buyer signs an ERC-3009 `ReceiveWithAuthorization` whose nonce is the escrow id,
///      and the id is derived from every term, so a submitter that alters any term breaks the
///      signature and the token itself refuses a second use of the same authorization.
///      Storage is one slot per escrow (its state); terms are re-sent as calldata to settle,
///      and the delivery hash lives only in the `Delivered` event.
contract X402Escrow {
    /// @notice What the buyer agreed to pay, to whom, and until when.
    struct Terms {
        /// @dev Payer; the `from` of the ERC-3009 authorization and the only refund recipient.
        address buyer;
        /// @dev Receives the funds on delivery (x402 `payTo`).
        address seller;
        /// @dev May post the delivery hash and refund early besides the seller (its server key or a facilitator).
        address operator;
        /// @dev ERC-3009 token escrowed (x402 `asset`).
        address token;
        /// @dev Amount in the token's atomic units (x402 `amount`).
        uint256 amount;
        /// @dev Unix seconds; a delivery must land strictly before it, a third-party refund at or after it.
        uint64 deadline;
        /// @dev Binds the payment to one HTTP request: method, resource URL and body digest.
        bytes32 requestHash;
        /// @dev The buyer's random 32 bytes, so that identical purchases get distinct ids.
        bytes32 salt;
    }

    /// @notice Where an escrow stands. `None` is the zero value: never deposited.
    enum State {
        None,
        Held,
        Released,
        Refunded
    }

    /// @notice EIP-712-style type hash of `Terms`; the first word hashed into every terms hash.
    bytes32 public constant TERMS_TYPEHASH = keccak256(
        "Terms(address buyer,address seller,address operator,address token,uint256 amount,uint64 deadline,bytes32 requestHash,bytes32 salt)"
    );

    /// @notice The latest deadline a deposit may set, counted from the deposit's block.
    /// @dev Bounds how long a payment can be locked whatever the buyer signed.
    uint256 public constant MAX_DEADLINE_WINDOW = 30 days;

    /// @notice State of each escrow, by id.
    mapping(bytes32 id => State) private _states;

    /// @notice Set while a state-changing call runs; cleared at the end of the transaction at the latest.
    bool private transient _entered;

    /// @notice A payment is now held.
    /// @param id Escrow id, also the ERC-3009 nonce that the buyer signed.
    /// @param buyer Payer and refund recipient.
    /// @param seller Delivery recipient.
    /// @param operator May deliver and refund early besides the seller.
    /// @param token Token held.
    /// @param amount Atomic units held.
    /// @param deadline Unix seconds; end of the delivery window.
    /// @param requestHash The HTTP request this payment buys.
    /// @param salt The buyer's uniqueness salt.
    event Deposited(
        bytes32 indexed id,
        address indexed buyer,
        address indexed seller,
        address operator,
        address token,
        uint256 amount,
        uint64 deadline,
        bytes32 requestHash,
        bytes32 salt
    );

    /// @notice The seller committed to what it served; the funds went to the seller.
    /// @param id Escrow id.
    /// @param deliveryHash keccak256 of the exact response body bytes served for this escrow.
    event Delivered(bytes32 indexed id, bytes32 deliveryHash);

    /// @notice The funds went back to the buyer.
    /// @param id Escrow id.
    /// @param caller Who triggered the refund: seller, operator, buyer or a keeper.
    event Refunded(bytes32 indexed id, address indexed caller);

    /// @notice A deposit of nothing.
    error ZeroAmount();

    /// @notice A deposit whose funds could never be released.
    error ZeroSeller();

    /// @notice The token address holds no contract.
    /// @param token The address given as token.
    error NotAContract(address token);

    /// @notice The delivery window is closed: the block time is at or after the deadline.
    /// @param deadline The escrow's deadline.
    /// @param now_ The current block time.
    error DeadlinePassed(uint64 deadline, uint256 now_);

    /// @notice A deadline further ahead than `MAX_DEADLINE_WINDOW` allows.
    /// @param deadline The deadline asked for.
    /// @param maxDeadline The latest deadline allowed in this block.
    error DeadlineTooFar(uint64 deadline, uint256 maxDeadline);

    /// @notice This id was deposited before.
    /// @param id Escrow id.
    /// @param state Its current state.
    error AlreadyDeposited(bytes32 id, State state);

    /// @notice The escrow is not held: never deposited (`None`) or already settled.
    /// @param id Escrow id.
    /// @param state Its current state.
    error NotHeld(bytes32 id, State state);

    /// @notice Only the seller or the operator may do this.
    /// @param caller Who called.
    /// @param seller The escrow's seller.
    /// @param operator The escrow's operator.
    error NotSellerOrOperator(address caller, address seller, address operator);

    /// @notice Before the deadline only the seller or the operator may refund.
    /// @param deadline The escrow's deadline.
    /// @param now_ The current block time.
    /// @param caller Who called.
    error RefundBeforeDeadline(uint64 deadline, uint256 now_, address caller);

    /// @notice The token did not transfer: it reverted or returned false.
    /// @param token The token.
    /// @param to The recipient.
    /// @param amount The amount.
    /// @param reason The token's own revert data (empty if it returned false or reverted bare),
    ///        so the cause, e.g. a blacklist or a refused re-entry, is never hidden.
    error TransferFailed(address token, address to, uint256 amount, bytes reason);

    /// @notice Batch arrays of different lengths.
    /// @param terms Number of terms.
    /// @param deliveryHashes Number of delivery hashes.
    error LengthMismatch(uint256 terms, uint256 deliveryHashes);

    /// @notice A call re-entered the escrow while another was running (a token calling back).
    error Reentrancy();

    /// @dev A token may call back into the escrow during a transfer; nothing may run until the outer call is done.
    modifier nonReentrant() {
        if (_entered) revert Reentrancy();
        _entered = true;
        _;
        _entered = false;
    }

    /// @notice Pulls the buyer's signed payment into the escrow and holds it.
    /// @dev Anyone may submit: the buyer's signature authorises exactly these terms.
    ///      Uses `receiveWithAuthorization`, never `transferWithAuthorization`: the latter can be
    ///      front-run into this contract by anyone, leaving funds here with no record.
    /// @param t The terms; `t.buyer` signed a `ReceiveWithAuthorization` to this contract for
    ///        `t.amount` with nonce `escrowId(t)`.
    /// @param validAfter Passed to the token: the authorization is valid strictly after it.
    /// @param validBefore Passed to the token: the authorization is valid strictly before it.
    /// @param signature The buyer's signature: 65 bytes (r, s, v) from an EOA, or any length for an EIP-1271 wallet.
    /// @return id The escrow id.
    function deposit(Terms calldata t, uint256 validAfter, uint256 validBefore, bytes calldata signature)
        external
        nonReentrant
        returns (bytes32 id)
    {
        // Nothing to hold.
        if (t.amount == 0) revert ZeroAmount();
        // A release would send the funds nowhere.
        if (t.seller == address(0)) revert ZeroSeller();
        // The delivery window must still be open.
        if (block.timestamp >= t.deadline) revert DeadlinePassed(t.deadline, block.timestamp);
        // Funds are never locked for longer than the fixed window.
        if (t.deadline > block.timestamp + MAX_DEADLINE_WINDOW) {
            revert DeadlineTooFar(t.deadline, block.timestamp + MAX_DEADLINE_WINDOW);
        }
        // A token with no code would "transfer" without moving anything.
        if (t.token.code.length == 0) revert NotAContract(t.token);
        id = escrowId(t);
        State state = _states[id];
        // Once per id, even with a token that does not enforce its nonces.
        if (state != State.None) revert AlreadyDeposited(id, state);

        _states[id] = State.Held;

        emit Deposited(id, t.buyer, t.seller, t.operator, t.token, t.amount, t.deadline, t.requestHash, t.salt);

        _pull(t, validAfter, validBefore, signature, id);
    }

    /// @notice Releases a held payment to the seller and records the hash of what was served.
    /// @param t The escrow's terms.
    /// @param deliveryHash keccak256 of the exact response body bytes.
    function deliver(Terms calldata t, bytes32 deliveryHash) external nonReentrant {
        _release(t, deliveryHash, false);
        _send(t.token, t.seller, t.amount);
    }

    /// @notice Returns a held payment to the buyer: by anyone once the deadline is reached,
    ///         by the seller or the operator at any time (the handler failed).
    /// @param t The escrow's terms.
    function refund(Terms calldata t) external nonReentrant {
        _refund(t, false);
        _send(t.token, t.buyer, t.amount);
    }

    /// @notice `deliver` for many escrows; entries already settled are skipped, not reverted.
    /// @dev Consecutive entries paying the same seller in the same token are paid in one transfer:
    ///      sort a batch by (token, seller) to make the most of it.
    /// @param ts The escrows' terms.
    /// @param deliveryHashes One delivery hash per entry of `ts`.
    /// @return released How many entries this call released.
    function deliverMany(Terms[] calldata ts, bytes32[] calldata deliveryHashes)
        external
        nonReentrant
        returns (uint256 released)
    {
        // Every entry needs its own hash.
        if (ts.length != deliveryHashes.length) revert LengthMismatch(ts.length, deliveryHashes.length);
        Payout memory payout;
        for (uint256 i; i < ts.length; ++i) {
            Terms calldata t = ts[i];
            if (_release(t, deliveryHashes[i], true)) {
                _accumulate(payout, t.token, t.seller, t.amount);
                ++released;
            }
        }
        _flush(payout);
    }

    /// @notice `refund` for many escrows; entries already settled are skipped, not reverted,
    ///         so keepers racing each other waste gas but never fail.
    /// @dev Consecutive entries refunding the same buyer in the same token are paid in one transfer.
    /// @param ts The escrows' terms.
    /// @return refunded How many entries this call refunded.
    function refundMany(Terms[] calldata ts) external nonReentrant returns (uint256 refunded) {
        Payout memory payout;
        for (uint256 i; i < ts.length; ++i) {
            Terms calldata t = ts[i];
            if (_refund(t, true)) {
                _accumulate(payout, t.token, t.buyer, t.amount);
                ++refunded;
            }
        }
        _flush(payout);
    }

    /// @notice The state of an escrow.
    /// @param id Escrow id.
    /// @return The state: None (never deposited), Held, Released or Refunded.
    function stateOf(bytes32 id) external view returns (State) {
        return _states[id];
    }

    /// @notice The hash of the terms: keccak256(abi.encode(TERMS_TYPEHASH, <the eight fields>)).
    /// @param t The terms.
    /// @return hash The terms hash.
    function termsHash(Terms calldata t) public pure returns (bytes32 hash) {
        // Each field is read once through the ABI decoder, which reverts on dirty high bits, so
        // hashing the eight static words as they lie in calldata equals hashing the decoded values.
        _validate(t);
        bytes32 typehash = TERMS_TYPEHASH;
        assembly ("memory-safe") {
            let m := mload(0x40)
            mstore(m, typehash)
            calldatacopy(add(m, 0x20), t, 0x100)
            hash := keccak256(m, 0x120)
        }
    }

    /// @notice The escrow id of the terms, on this chain and this contract; also the ERC-3009 nonce.
    /// @param t The terms.
    /// @return keccak256(abi.encode(block.chainid, address(this), termsHash(t))).
    function escrowId(Terms calldata t) public view returns (bytes32) {
        return keccak256(abi.encode(block.chainid, address(this), termsHash(t)));
    }

    /// @dev Reverts unless every field is ABI-clean (no dirty high bits in the addresses or the deadline).
    function _validate(Terms calldata t) private pure {
        assembly ("memory-safe") {
            let clean := 1
            for { let i := 0 } lt(i, 4) { i := add(i, 1) } {
                clean := and(clean, iszero(shr(160, calldataload(add(t, mul(i, 0x20))))))
            }
            clean := and(clean, iszero(shr(64, calldataload(add(t, 0xa0)))))
            if iszero(clean) { revert(0, 0) }
        }
    }

    /// @dev Checks and effects of a release; returns false for a settled entry when `skipSettled`.
    function _release(Terms calldata t, bytes32 deliveryHash, bool skipSettled) private returns (bool) {
        bytes32 id = escrowId(t);
        State state = _states[id];
        // Racing batch posters: a settled entry is done, not an error.
        if (skipSettled && (state == State.Released || state == State.Refunded)) return false;
        // Only held funds can be released.
        if (state != State.Held) revert NotHeld(id, state);
        // Only the seller's side vouches for a delivery.
        if (msg.sender != t.seller && msg.sender != t.operator) {
            revert NotSellerOrOperator(msg.sender, t.seller, t.operator);
        }
        // Strictly before the deadline, so release and third-party refund never overlap.
        if (block.timestamp >= t.deadline) revert DeadlinePassed(t.deadline, block.timestamp);

        _states[id] = State.Released;

        emit Delivered(id, deliveryHash);
        return true;
    }

    /// @dev Checks and effects of a refund; returns false for a settled entry when `skipSettled`.
    function _refund(Terms calldata t, bool skipSettled) private returns (bool) {
        bytes32 id = escrowId(t);
        State state = _states[id];
        // Racing keepers: a settled entry is done, not an error.
        if (skipSettled && (state == State.Released || state == State.Refunded)) return false;
        // Only held funds can be refunded.
        if (state != State.Held) revert NotHeld(id, state);
        // Before the deadline the seller's side alone may give up the payment.
        if (block.timestamp < t.deadline && msg.sender != t.seller && msg.sender != t.operator) {
            revert RefundBeforeDeadline(t.deadline, block.timestamp, msg.sender);
        }

        _states[id] = State.Refunded;

        emit Refunded(id, msg.sender);
        return true;
    }

    /// @dev Pulls the payment with the signature encoding the token understands best.
    function _pull(Terms calldata t, uint256 validAfter, uint256 validBefore, bytes calldata signature, bytes32 id)
        private
    {
        if (signature.length == 65) {
            // The (v, r, s) form exists on every ERC-3009 token; the bytes form only on newer ones.
            bytes32 r = bytes32(signature[0:32]);
            bytes32 s = bytes32(signature[32:64]);
            uint8 v = uint8(signature[64]);
            IERC3009(t.token).receiveWithAuthorization(
                t.buyer, address(this), t.amount, validAfter, validBefore, id, v, r, s
            );
        } else {
            IERC3009(t.token).receiveWithAuthorization(
                t.buyer, address(this), t.amount, validAfter, validBefore, id, signature
            );
        }
    }

    /// @dev A pending transfer, accumulated over consecutive batch entries with the same token and recipient.
    struct Payout {
        address token;
        address to;
        uint256 amount;
    }

    /// @dev Adds to the pending transfer, first sending it if the token or recipient changes.
    function _accumulate(Payout memory payout, address token, address to, uint256 amount) private {
        if (payout.token != token || payout.to != to) {
            _flush(payout);
            payout.token = token;
            payout.to = to;
        }
        payout.amount += amount;
    }

    /// @dev Sends the pending transfer, if any.
    function _flush(Payout memory payout) private {
        if (payout.amount != 0) {
            _send(payout.token, payout.to, payout.amount);
            payout.amount = 0;
        }
    }

    /// @dev ERC-20 transfer that accepts tokens returning nothing and rejects those returning false.
    function _send(address token, address to, uint256 amount) private {
        (bool ok, bytes memory data) = token.call(abi.encodeWithSelector(0xa9059cbb, to, amount));
        if (!ok) revert TransferFailed(token, to, amount, data);
        if (data.length != 0 && (data.length < 32 || abi.decode(data, (uint256)) != 1)) {
            revert TransferFailed(token, to, amount, "");
        }
    }
}
