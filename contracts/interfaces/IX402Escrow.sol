// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

/// @title IX402Escrow
/// @notice The interface of X402Escrow: its types, events, errors and functions (DESIGN.md sections 1 and 8).
/// @dev Kept apart from the implementation, as commerce-payments and permit2 do, so that integrators
///      (sellers' posters, keepers, indexers) compile against the interface alone.
interface IX402Escrow {
    /// @notice What the buyer agreed to pay, to whom, and until when.
    struct Terms {
        /// @dev Payer; the `from` of the ERC-3009 authorization and the only refund recipient.
        address buyer;
        /// @dev Receives the funds on delivery or settlement (x402 `payTo`).
        address seller;
        /// @dev May post the delivery hash, settle and refund early besides the seller (its server key or a facilitator).
        address operator;
        /// @dev ERC-3009 token paid (x402 `asset`).
        address token;
        /// @dev Amount in the token's atomic units (x402 `amount`).
        uint256 amount;
        /// @dev Unix seconds; a delivery or settlement must land strictly before it, a third-party refund at or after it.
        uint64 deadline;
        /// @dev Binds the payment to one HTTP request: method, resource URL and body digest.
        bytes32 requestHash;
        /// @dev The buyer's random 32 bytes, so that identical purchases get distinct ids.
        bytes32 salt;
    }

    /// @notice One serve-first payment to settle: the buyer's signed authorization and the hash of what was served.
    struct Settlement {
        /// @dev The terms; the buyer signed a `ReceiveWithAuthorization` to the escrow with nonce `escrowId(terms)`.
        Terms terms;
        /// @dev Passed to the token: the authorization is valid strictly after it.
        uint256 validAfter;
        /// @dev Passed to the token: the authorization is valid strictly before it.
        uint256 validBefore;
        /// @dev The buyer's signature: 65 bytes (r, s, v) from an EOA, or any length for an EIP-1271 wallet.
        bytes signature;
        /// @dev keccak256 of the exact response body bytes served; never zero.
        bytes32 deliveryHash;
    }

    /// @notice Where an escrow stands. `None` is the zero value: never deposited (or settled serve-first,
    ///         which takes no storage; its record is the `Settled` event and the token's used nonce).
    enum State {
        None,
        Held,
        Released,
        Refunded
    }

    /// @notice Why `settleMany` skipped an entry.
    enum SkipReason {
        /// @dev The block time reached the entry's deadline (it crossed it between simulation and inclusion).
        DeadlinePassed,
        /// @dev The token address holds no contract.
        NotAContract,
        /// @dev The buyer's balance is below the amount (it moved its funds).
        InsufficientBalance,
        /// @dev The token refused the pull: authorization used, cancelled, expired or not yet valid, bad signature.
        PullFailed
    }

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

    /// @notice The seller committed to what it served; the held funds went to the seller.
    /// @param id Escrow id.
    /// @param deliveryHash keccak256 of the exact response body bytes served for this escrow.
    event Delivered(bytes32 indexed id, bytes32 deliveryHash);

    /// @notice The held funds went back to the buyer.
    /// @param id Escrow id.
    /// @param caller Who triggered the refund: seller, operator, buyer or a keeper.
    event Refunded(bytes32 indexed id, address indexed caller);

    /// @notice A serve-first payment was pulled from the buyer and paid to the seller, committing the hash.
    /// @dev The id is the ERC-3009 nonce the pull consumed; the buyer's `recover()` finds the hash by id.
    /// @param id Escrow id.
    /// @param deliveryHash keccak256 of the exact response body bytes served for this payment.
    event Settled(bytes32 indexed id, bytes32 deliveryHash);

    /// @notice `settleMany` skipped an entry: nothing moved for it, and the rest of the batch went on.
    /// @param id Escrow id.
    /// @param reason Why.
    event SettlementSkipped(bytes32 indexed id, SkipReason reason);

    /// @notice A batch payout (`deliverMany`/`refundMany`) failed: its entries are Held again, unchanged,
    ///         and emitted no `Delivered`/`Refunded` event; the rest of the batch went on.
    /// @param token The token that refused the transfer.
    /// @param to The recipient (a seller for deliveries, a buyer for refunds).
    /// @param amount The amount of the consecutive entries paid together.
    event PayoutFailed(address indexed token, address indexed to, uint256 amount);

    /// @notice A deposit or settlement of nothing.
    error ZeroAmount();

    /// @notice A deposit or settlement whose funds could never reach a seller.
    error ZeroSeller();

    /// @notice An unset delivery hash: a bug in the caller, not a delivery.
    /// @param id Escrow id.
    error ZeroDeliveryHash(bytes32 id);

    /// @notice Terms that are not ABI-clean: dirty high bits in an address or in the deadline.
    /// @param field Index of the first dirty field (0 buyer, 1 seller, 2 operator, 3 token, 5 deadline).
    error MalformedTerms(uint256 field);

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

    /// @notice A batch was sent with too little gas for the next token call to get its full allowance,
    ///         so a failure of that call could not be told apart from starvation. Send it with more gas.
    /// @param needed Gas the call needs left before it.
    /// @param left Gas left.
    error InsufficientGas(uint256 needed, uint256 left);

    /// @notice A call re-entered the escrow while another was running (a token calling back).
    error Reentrancy();

    /// @notice Pulls the buyer's signed payment into the escrow and holds it (hold mode).
    /// @param t The terms; `t.buyer` signed a `ReceiveWithAuthorization` to the escrow for
    ///        `t.amount` with nonce `escrowId(t)`.
    /// @param validAfter Passed to the token: the authorization is valid strictly after it.
    /// @param validBefore Passed to the token: the authorization is valid strictly before it.
    /// @param signature The buyer's signature: 65 bytes (r, s, v) from an EOA, or any length for an EIP-1271 wallet.
    /// @return id The escrow id.
    function deposit(Terms calldata t, uint256 validAfter, uint256 validBefore, bytes calldata signature)
        external
        returns (bytes32 id);

    /// @notice Releases a held payment to the seller and records the hash of what was served.
    /// @param t The escrow's terms.
    /// @param deliveryHash keccak256 of the exact response body bytes; never zero.
    function deliver(Terms calldata t, bytes32 deliveryHash) external;

    /// @notice Returns a held payment to the buyer: by anyone once the deadline is reached,
    ///         by the seller or the operator at any time (the handler failed).
    /// @param t The escrow's terms.
    function refund(Terms calldata t) external;

    /// @notice `deliver` for many escrows, skipping entries that are not Held or past their deadline.
    /// @param ts The escrows' terms.
    /// @param deliveryHashes One delivery hash per entry of `ts`.
    /// @return released How many entries this call released.
    function deliverMany(Terms[] calldata ts, bytes32[] calldata deliveryHashes) external returns (uint256 released);

    /// @notice `refund` for many escrows, skipping entries that are not Held or, for a third party, not yet due.
    /// @param ts The escrows' terms.
    /// @return refunded How many entries this call refunded.
    function refundMany(Terms[] calldata ts) external returns (uint256 refunded);

    /// @notice Pulls a serve-first payment and pays the seller in one transaction, committing the delivery hash.
    /// @param t The terms; `t.buyer` signed the same `ReceiveWithAuthorization` a deposit uses.
    /// @param validAfter Passed to the token: the authorization is valid strictly after it.
    /// @param validBefore Passed to the token: the authorization is valid strictly before it.
    /// @param signature The buyer's signature, as for `deposit`.
    /// @param deliveryHash keccak256 of the exact response body bytes served; never zero.
    /// @return id The escrow id.
    function settle(
        Terms calldata t,
        uint256 validAfter,
        uint256 validBefore,
        bytes calldata signature,
        bytes32 deliveryHash
    ) external returns (bytes32 id);

    /// @notice `settle` for many payments; an entry whose pull fails or whose deadline passed is skipped
    ///         and reported, never reverting the batch; payouts to one seller are paid together.
    /// @param batch The payments.
    /// @return settled How many entries this call settled.
    /// @return skipped The indexes in `batch` of the entries skipped, in order.
    function settleMany(Settlement[] calldata batch) external returns (uint256 settled, uint256[] memory skipped);

    /// @notice The state of an escrow.
    /// @param id Escrow id.
    /// @return The state: None (never deposited, or settled serve-first), Held, Released or Refunded.
    function stateOf(bytes32 id) external view returns (State);

    /// @notice The hash of the terms: keccak256(abi.encode(TERMS_TYPEHASH, <the eight fields>)).
    /// @param t The terms.
    /// @return hash The terms hash.
    function termsHash(Terms calldata t) external pure returns (bytes32 hash);

    /// @notice The escrow id of the terms, on this chain and this contract; also the ERC-3009 nonce.
    /// @param t The terms.
    /// @return keccak256(abi.encode(block.chainid, address(this), termsHash(t))).
    function escrowId(Terms calldata t) external view returns (bytes32);
}
