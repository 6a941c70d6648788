// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {IX402Escrow} from "./interfaces/IX402Escrow.sol";

/// @title X402Escrow
/// @notice Holds an x402 payment until the seller commits to what it delivered, and gives it
///         back to the buyer once the deadline has passed without a delivery; or, serve-first,
///         pulls the payment and pays the seller in one step that commits the delivery hash.
/// @dev One immutable contract: no owner, no admin, no fees, no upgrade path, no constructor
///      arguments, so it lives at one CREATE2 address on every chain.
///      The buyer signs an ERC-3009 `ReceiveWithAuthorization` whose nonce is the escrow id,
///      and the id is derived from every term, so a submitter that alters any term breaks the
///      signature and the token itself refuses a second use of the same authorization.
///      Storage is one slot per held escrow (its state); terms are re-sent as calldata to settle,
///      and the delivery hash lives only in the `Delivered` and `Settled` events. A serve-first
///      settlement takes no slot at all: the token's used nonce is what refuses its reuse (a
///      deposit or a second settlement of the same id pulls with a spent nonce), and a deposited
///      id cannot be settled for the same reason.
///
///      Batches (`deliverMany`, `refundMany`, `settleMany`) skip, never revert on, what a race
///      can cause: an entry no longer (or never) Held, e.g. settled by a racing keeper or
///      reorged out; a delivery or settlement whose deadline passed between the sender's
///      simulation and inclusion; a third party's refund not yet due; a serve-first pull the
///      buyer defeated. They still revert on what only a buggy caller sends (arrays of different
///      lengths, a zero delivery hash, a delivery or settlement by someone other than the
///      seller's side), and with `InsufficientGas` when sent with too little gas.
///
///      A failed payout in `deliverMany`/`refundMany` is not all-or-nothing: its entries are put
///      back to Held exactly as they were, emit `PayoutFailed` instead of `Delivered`/`Refunded`,
///      and the rest of the batch goes on. So a token that refuses one recipient, or one that
///      pays in a simulation but reverts once mined (e.g. on `tx.gasprice != 0`), cannot keep
///      the other escrows of a keeper's batch from being refunded. Each such payout gets at most
///      `PAYOUT_GAS` and none of its return data beyond one word is copied, so its failure costs a
///      bounded amount; the batch first checks that the call will get all of `PAYOUT_GAS`, so a
///      failure is never the starvation of an honest token by a short gas limit. An entry is
///      settled if and only if its `Delivered`/`Refunded` event is in the receipt.
///      In `settleMany` the aggregated payout to a seller stays all-or-nothing (`TransferFailed`
///      reverts the batch): the pulled funds have no Held state to go back to.
///
/// @custom:known-limits
///      - A token that blacklists the buyer makes the refund revert, and the funds stay Held
///        until the blacklist lifts. Deliberately no fallback recipient: one would make the escrow
///        a route around a freeze. A token that blacklists the seller makes delivery fail; the
///        buyer is refunded after the deadline.
///      - Fee-on-transfer and rebasing tokens break the invariant that the escrow's balance of a
///        token is the sum of its Held amounts; the damage stays within that token's escrows.
///      - A token whose `receiveWithAuthorization` does not enforce `to == msg.sender` lets anyone
///        front-run the buyer's authorization into a plain transfer, stranding the payment.
///      - A token that does not enforce its ERC-3009 nonces could be settled twice, or settled
///        after a deposit, within its own escrows; honest tokens refuse the spent nonce.
///      - A token that burns the gas it is given can still make a batch run out of gas when its
///        sender estimated the gas without it: each of its calls costs at most `PAYOUT_GAS` or
///        `PULL_GAS`, but those add up; keepers bisect a mined revert.
///      - A serve-first pull of an EIP-1271 wallet needing more than `PULL_GAS` is skipped by
///        `settleMany`; `settle` gives it all the gas there is.
///      - The delivery hash proves what was served, not its quality.
contract X402Escrow is IX402Escrow {
    /// @notice EIP-712-style type hash of `Terms`; the first word hashed into every terms hash.
    bytes32 public constant TERMS_TYPEHASH = keccak256(
        "Terms(address buyer,address seller,address operator,address token,uint256 amount,uint64 deadline,bytes32 requestHash,bytes32 salt)"
    );

    /// @notice The latest deadline a deposit may set, counted from the deposit's block.
    /// @dev Bounds how long a payment can be locked whatever the buyer signed.
    uint256 public constant MAX_DEADLINE_WINDOW = 30 days;

    /// @notice Gas given to each token transfer of a `deliverMany`/`refundMany` payout.
    /// @dev USDC's transfer costs under 45,000 even to a recipient with no balance yet.
    uint256 internal constant PAYOUT_GAS = 100_000;

    /// @notice Gas given to each buyer's pull in `settleMany` (the token's signature check included).
    uint256 internal constant PULL_GAS = 300_000;

    /// @notice Gas a batch keeps after a capped call that used all it was given, enough for the
    ///         aggregated transfer that may follow it.
    uint256 internal constant BATCH_GAS_RESERVE = 100_000;

    /// @dev A call's gas argument meaning "all there is": the EVM gives a callee at most 63/64 of what is left.
    uint256 private constant ALL_GAS = type(uint256).max;

    /// @dev Gas given to the `balanceOf` look-up before a `settleMany` pull.
    uint256 private constant BALANCE_GAS = 50_000;

    /// @dev The call's own cost around the callee's allowance: a cold account, memory, the return.
    uint256 private constant CALL_OVERHEAD = 10_000;

    /// @dev Gas a batch needs before a capped payout, and before a capped pull: the callee gets
    ///      63/64 of what is left (EIP-150), so it needs 64/63 of its allowance, plus what follows.
    uint256 private constant PAYOUT_GAS_NEEDED = PAYOUT_GAS + PAYOUT_GAS / 63 + CALL_OVERHEAD;
    uint256 private constant PULL_GAS_NEEDED = PULL_GAS + PULL_GAS / 63 + CALL_OVERHEAD + BATCH_GAS_RESERVE;

    /// @dev ERC-20 `transfer(address,uint256)`.
    bytes4 private constant TRANSFER_SELECTOR = bytes4(keccak256("transfer(address,uint256)"));
    /// @dev ERC-20 `balanceOf(address)`.
    bytes4 private constant BALANCE_OF_SELECTOR = bytes4(keccak256("balanceOf(address)"));
    /// @dev ERC-3009 `receiveWithAuthorization` with the signature as (v, r, s): on every FiatToken version.
    bytes4 private constant RECEIVE_VRS_SELECTOR = bytes4(
        keccak256("receiveWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)")
    );
    /// @dev ERC-3009 `receiveWithAuthorization` with the signature as bytes: EOA or EIP-1271 wallet (FiatToken v2.2).
    bytes4 private constant RECEIVE_BYTES_SELECTOR =
        bytes4(keccak256("receiveWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"));

    /// @dev Escrow states as stored: a full word, so a write needs no read of the slot first.
    uint256 private constant HELD = uint256(State.Held);
    uint256 private constant RELEASED = uint256(State.Released);
    uint256 private constant REFUNDED = uint256(State.Refunded);

    // Storage: one slot per escrow, its `State` as a full word (a write needs no read of the slot first),
    // at the slot numbered by the escrow id itself (`_state`, `_setState`). Ids are keccak256 outputs: they
    // meet neither each other nor any other slot (the contract has no other storage), so no mapping hash
    // is needed to place them. Read through `stateOf`.

    /// @notice Non-zero while a state-changing call runs; cleared at its end, and at the end of the transaction at the latest.
    /// @dev A full word: setting it needs no read-modify-write.
    uint256 private transient _entered;

    /// @dev A pending batch payout: consecutive entries with the same token and recipient, paid in one transfer.
    struct Payout {
        address token;
        address to;
        uint256 amount;
        /// @dev Index in the batch's queue of the first entry of this payout.
        uint256 first;
    }

    /// @dev A token may call back into the escrow during a transfer; nothing may run until the outer call is done.
    modifier nonReentrant() {
        if (_entered != 0) revert Reentrancy();
        _entered = 1;
        _;
        _entered = 0;
    }

    /// @inheritdoc IX402Escrow
    /// @dev Anyone may submit: the buyer's signature authorises exactly these terms.
    ///      Uses `receiveWithAuthorization`, never `transferWithAuthorization`: the latter can be
    ///      front-run into this contract by anyone, leaving funds here with no record.
    function deposit(Terms calldata t, uint256 validAfter, uint256 validBefore, bytes calldata signature)
        external
        nonReentrant
        returns (bytes32 id)
    {
        id = _id(t);
        // Nothing to hold.
        if (t.amount == 0) revert ZeroAmount();
        // A release would send the funds nowhere.
        if (_sellerOf(t) == address(0)) revert ZeroSeller();
        // The delivery window must still be open.
        if (block.timestamp >= _deadlineOf(t)) revert DeadlinePassed(_deadlineOf(t), block.timestamp);
        uint256 maxDeadline;
        unchecked {
            maxDeadline = block.timestamp + MAX_DEADLINE_WINDOW; // a timestamp is far from 2**256
        }
        // Funds are never locked for longer than the fixed window.
        if (_deadlineOf(t) > maxDeadline) revert DeadlineTooFar(_deadlineOf(t), maxDeadline);
        // A token with no code would "transfer" without moving anything (the pull below is a raw call).
        if (_tokenOf(t).code.length == 0) revert NotAContract(_tokenOf(t));
        uint256 state = _state(id);
        // Once per id, even with a token that does not enforce its nonces.
        if (state != 0) revert AlreadyDeposited(id, State(state));

        _setState(id, HELD);

        _emitDeposited(t, id);

        // The token's own revert (spent nonce, bad signature, expired, no balance) is the caller's answer.
        if (!_pull(t, validAfter, validBefore, signature, id, ALL_GAS)) _bubbleRevert();
    }

    /// @inheritdoc IX402Escrow
    function deliver(Terms calldata t, bytes32 deliveryHash) external nonReentrant {
        bytes32 id = _id(t);
        // An unset hash is a bug in the caller, not a delivery.
        if (deliveryHash == 0) revert ZeroDeliveryHash(id);
        uint256 state = _state(id);
        // Only held funds can be released.
        if (state != HELD) revert NotHeld(id, State(state));
        // Only the seller's side vouches for a delivery.
        if (msg.sender != _sellerOf(t) && msg.sender != _operatorOf(t)) {
            revert NotSellerOrOperator(msg.sender, _sellerOf(t), _operatorOf(t));
        }
        // Strictly before the deadline, so release and third-party refund never overlap.
        if (block.timestamp >= _deadlineOf(t)) revert DeadlinePassed(_deadlineOf(t), block.timestamp);

        _setState(id, RELEASED);

        emit Delivered(id, deliveryHash);
        _send(_tokenOf(t), _sellerOf(t), t.amount);
    }

    /// @inheritdoc IX402Escrow
    function refund(Terms calldata t) external nonReentrant {
        bytes32 id = _id(t);
        uint256 state = _state(id);
        // Only held funds can be refunded.
        if (state != HELD) revert NotHeld(id, State(state));
        // Before the deadline the seller's side alone may give up the payment.
        if (block.timestamp < _deadlineOf(t) && msg.sender != _sellerOf(t) && msg.sender != _operatorOf(t)) {
            revert RefundBeforeDeadline(_deadlineOf(t), block.timestamp, msg.sender);
        }

        _setState(id, REFUNDED);

        emit Refunded(id, msg.sender);
        _send(_tokenOf(t), _buyerOf(t), t.amount);
    }

    /// @inheritdoc IX402Escrow
    /// @dev Consecutive entries paying the same seller in the same token are paid in one transfer:
    ///      sort a batch by (token, seller) to make the most of it. A failed payout puts its entries
    ///      back to Held and emits `PayoutFailed` (see the contract's notes).
    function deliverMany(Terms[] calldata ts, bytes32[] calldata deliveryHashes)
        external
        nonReentrant
        returns (uint256 released)
    {
        // Every entry needs its own hash.
        if (ts.length != deliveryHashes.length) revert LengthMismatch(ts.length, deliveryHashes.length);
        bytes32[] memory ids = new bytes32[](ts.length);
        bytes32[] memory hashes = new bytes32[](ts.length);
        uint256 queued;
        Payout memory payout;
        for (uint256 i; i < ts.length; ++i) {
            Terms calldata t = ts[i];
            bytes32 id = _id(t);
            bytes32 deliveryHash = deliveryHashes[i];
            // An unset hash is a bug in the caller, whatever the entry's state.
            if (deliveryHash == 0) revert ZeroDeliveryHash(id);
            // Only the seller's side vouches for a delivery, whatever the entry's state.
            if (msg.sender != _sellerOf(t) && msg.sender != _operatorOf(t)) {
                revert NotSellerOrOperator(msg.sender, _sellerOf(t), _operatorOf(t));
            }
            // Not held (settled by a racing poster, or never deposited, e.g. reorged out): done, not an error.
            if (_state(id) != HELD) continue;
            // Past its deadline (it passed after the poster's simulation): the buyer's to refund, not an error.
            if (block.timestamp >= _deadlineOf(t)) continue;

            _setState(id, RELEASED);

            released += _queue(payout, _tokenOf(t), _sellerOf(t), t.amount, queued, ids, hashes);
            ids[queued] = id;
            hashes[queued] = deliveryHash;
            ++queued;
        }
        released += _payOrRestore(payout, queued, ids, hashes);
    }

    /// @inheritdoc IX402Escrow
    /// @dev Consecutive entries refunding the same buyer in the same token are paid in one transfer.
    ///      Keepers racing each other waste gas but never fail. A failed payout puts its entries back
    ///      to Held and emits `PayoutFailed` (see the contract's notes).
    function refundMany(Terms[] calldata ts) external nonReentrant returns (uint256 refunded) {
        bytes32[] memory ids = new bytes32[](ts.length);
        bytes32[] memory noHashes;
        uint256 queued;
        Payout memory payout;
        for (uint256 i; i < ts.length; ++i) {
            Terms calldata t = ts[i];
            bytes32 id = _id(t);
            // Not held (refunded by a racing keeper, delivered, or never deposited, e.g. reorged out): done.
            if (_state(id) != HELD) continue;
            // A third party's refund before the deadline is not due yet: skipped, retried after it.
            if (block.timestamp < _deadlineOf(t) && msg.sender != _sellerOf(t) && msg.sender != _operatorOf(t)) continue;

            _setState(id, REFUNDED);

            refunded += _queue(payout, _tokenOf(t), _buyerOf(t), t.amount, queued, ids, noHashes);
            ids[queued] = id;
            ++queued;
        }
        refunded += _payOrRestore(payout, queued, ids, noHashes);
    }

    /// @inheritdoc IX402Escrow
    function settle(
        Terms calldata t,
        uint256 validAfter,
        uint256 validBefore,
        bytes calldata signature,
        bytes32 deliveryHash
    ) external nonReentrant returns (bytes32 id) {
        id = _id(t);
        _checkSettlement(t, id, deliveryHash);
        // Strictly before the deadline, like a delivery.
        if (block.timestamp >= _deadlineOf(t)) revert DeadlinePassed(_deadlineOf(t), block.timestamp);
        // A token with no code would "transfer" without moving anything (the pull below is a raw call).
        if (_tokenOf(t).code.length == 0) revert NotAContract(_tokenOf(t));

        // The token's own revert (spent nonce: settled or deposited before; bad signature; no balance) is the answer.
        if (!_pull(t, validAfter, validBefore, signature, id, ALL_GAS)) _bubbleRevert();

        emit Settled(id, deliveryHash);
        _send(_tokenOf(t), _sellerOf(t), t.amount);
    }

    /// @inheritdoc IX402Escrow
    /// @dev Consecutive entries paying the same seller in the same token are paid in one transfer
    ///      at the end of their run; a failure of that transfer reverts the whole batch, because the
    ///      funds pulled for it have no Held state to go back to. Each pull gets at most `PULL_GAS`,
    ///      copies no return data, and is preceded by a balance check so that a buyer who moved its
    ///      funds costs little to skip.
    function settleMany(Settlement[] calldata batch)
        external
        nonReentrant
        returns (uint256 settled, uint256[] memory skipped)
    {
        skipped = new uint256[](batch.length);
        uint256 skips;
        Payout memory payout;
        for (uint256 i; i < batch.length; ++i) {
            Settlement calldata s = batch[i];
            Terms calldata t = s.terms;
            bytes32 id = _id(t);
            _checkSettlement(t, id, s.deliveryHash);
            (bool pulled, SkipReason reason) = _pullForSettlement(s, id, payout.token);
            if (!pulled) {
                skipped[skips++] = i;
                emit SettlementSkipped(id, reason);
                continue;
            }
            emit Settled(id, s.deliveryHash);
            if (payout.token != _tokenOf(t) || payout.to != _sellerOf(t) || payout.amount > type(uint256).max - t.amount) {
                _flush(payout);
                payout.token = _tokenOf(t);
                payout.to = _sellerOf(t);
            }
            payout.amount += t.amount;
            ++settled;
        }
        _flush(payout);
        assembly ("memory-safe") {
            mstore(skipped, skips)
        }
    }

    /// @inheritdoc IX402Escrow
    function stateOf(bytes32 id) external view returns (State) {
        return State(_state(id));
    }

    /// @inheritdoc IX402Escrow
    function termsHash(Terms calldata t) public pure returns (bytes32 hash) {
        _validate(t);
        bytes32 typehash = TERMS_TYPEHASH;
        assembly ("memory-safe") {
            let m := mload(0x40)
            mstore(m, typehash)
            calldatacopy(add(m, 0x20), t, 0x100)
            hash := keccak256(m, 0x120)
        }
    }

    /// @inheritdoc IX402Escrow
    function escrowId(Terms calldata t) public view returns (bytes32) {
        return _id(t);
    }

    /// @dev The escrow id, hashed in scratch memory (a batch computes one per entry and keeps none).
    ///      Validating first makes hashing the eight static words as they lie in calldata equal
    ///      hashing the decoded values. One block, not `termsHash` plus a hash: every call is paid per entry.
    function _id(Terms calldata t) private view returns (bytes32 id) {
        bytes32 typehash = TERMS_TYPEHASH;
        uint256 dirty;
        assembly ("memory-safe") {
            let addresses := or(
                or(calldataload(t), calldataload(add(t, 0x20))), or(calldataload(add(t, 0x40)), calldataload(add(t, 0x60)))
            )
            dirty := or(shr(160, addresses), shr(64, calldataload(add(t, 0xa0))))
            let m := mload(0x40)
            mstore(m, typehash)
            calldatacopy(add(m, 0x20), t, 0x100)
            let hash := keccak256(m, 0x120)
            mstore(m, chainid())
            mstore(add(m, 0x20), address())
            mstore(add(m, 0x40), hash)
            id := keccak256(m, 0x60)
        }
        // The terms are ABI-clean: no dirty high bits in an address or the deadline.
        if (dirty != 0) _revertMalformed(t);
    }

    // Fields of terms that `_id` validated, read raw: the ABI decoder would check their high bits again at
    // every access. Only ever read after `_id(t)`. (`t.amount`, a full word, needs no check.)

    function _buyerOf(Terms calldata t) private pure returns (address buyer) {
        assembly ("memory-safe") {
            buyer := calldataload(t)
        }
    }

    function _sellerOf(Terms calldata t) private pure returns (address seller) {
        assembly ("memory-safe") {
            seller := calldataload(add(t, 0x20))
        }
    }

    function _operatorOf(Terms calldata t) private pure returns (address operator) {
        assembly ("memory-safe") {
            operator := calldataload(add(t, 0x40))
        }
    }

    function _tokenOf(Terms calldata t) private pure returns (address token) {
        assembly ("memory-safe") {
            token := calldataload(add(t, 0x60))
        }
    }

    function _deadlineOf(Terms calldata t) private pure returns (uint64 deadline) {
        assembly ("memory-safe") {
            deadline := calldataload(add(t, 0xa0))
        }
    }

    /// @dev Emits `Deposited` with every term. The six data words (operator, token, amount, deadline,
    ///      requestHash, salt) lie in that order in the validated calldata, so they are copied as they are.
    function _emitDeposited(Terms calldata t, bytes32 id) private {
        bytes32 topic = Deposited.selector;
        assembly ("memory-safe") {
            let m := mload(0x40)
            calldatacopy(m, add(t, 0x40), 0xc0)
            log4(m, 0xc0, topic, id, calldataload(t), calldataload(add(t, 0x20)))
        }
    }

    /// @dev Reverts with `MalformedTerms` unless every field is ABI-clean (no dirty high bits in the
    ///      four addresses or the uint64 deadline).
    function _validate(Terms calldata t) private pure {
        uint256 dirty;
        assembly ("memory-safe") {
            let addresses := or(
                or(calldataload(t), calldataload(add(t, 0x20))), or(calldataload(add(t, 0x40)), calldataload(add(t, 0x60)))
            )
            dirty := or(shr(160, addresses), shr(64, calldataload(add(t, 0xa0))))
        }
        if (dirty != 0) _revertMalformed(t);
    }

    /// @dev Reverts with `MalformedTerms` naming the first dirty field of terms known to have one.
    function _revertMalformed(Terms calldata t) private pure {
        uint256 field;
        while (field < 4 && _cleanAddress(t, field)) ++field;
        revert MalformedTerms(field == 4 ? 5 : field);
    }

    /// @dev Whether word `field` of the terms holds a clean address.
    function _cleanAddress(Terms calldata t, uint256 field) private pure returns (bool clean) {
        assembly ("memory-safe") {
            clean := iszero(shr(160, calldataload(add(t, mul(field, 0x20)))))
        }
    }

    /// @dev The rules a settlement breaks only through a buggy caller: reverted on, in a batch too.
    function _checkSettlement(Terms calldata t, bytes32 id, bytes32 deliveryHash) private view {
        // An unset hash is a bug in the caller, not a delivery.
        if (deliveryHash == 0) revert ZeroDeliveryHash(id);
        // Nothing to pay.
        if (t.amount == 0) revert ZeroAmount();
        // The payout would go nowhere.
        if (_sellerOf(t) == address(0)) revert ZeroSeller();
        // Only the seller's side vouches for a delivery, and only it may spend the buyer's authorization.
        if (msg.sender != _sellerOf(t) && msg.sender != _operatorOf(t)) {
            revert NotSellerOrOperator(msg.sender, _sellerOf(t), _operatorOf(t));
        }
    }

    /// @dev Escrow `id`'s state word, from the slot numbered by the id.
    function _state(bytes32 id) private view returns (uint256 state) {
        assembly ("memory-safe") {
            state := sload(id)
        }
    }

    /// @dev Writes escrow `id`'s state word.
    function _setState(bytes32 id, uint256 state) private {
        assembly ("memory-safe") {
            sstore(id, state)
        }
    }

    /// @dev Pulls one `settleMany` entry into the escrow, or says why it is skipped. `checkedToken`
    ///      is the token of the run being paid, known to hold code.
    function _pullForSettlement(Settlement calldata s, bytes32 id, address checkedToken)
        private
        returns (bool pulled, SkipReason reason)
    {
        Terms calldata t = s.terms;
        // Past its deadline (it passed after the seller's simulation): never paid, not an error.
        if (block.timestamp >= _deadlineOf(t)) return (false, SkipReason.DeadlinePassed);
        // A token with no code would "transfer" without moving anything (the pull is a raw call).
        if (_tokenOf(t) != checkedToken && _tokenOf(t).code.length == 0) return (false, SkipReason.NotAContract);
        // A buyer who moved its funds, skipped for little gas: the token would write the nonce before failing.
        if (_balanceBelow(_tokenOf(t), _buyerOf(t), t.amount)) return (false, SkipReason.InsufficientBalance);
        // A spent nonce (deposited or settled before), a cancelled or expired authorization, a bad signature.
        if (!_pull(t, s.validAfter, s.validBefore, s.signature, id, PULL_GAS)) return (false, SkipReason.PullFailed);
        return (true, reason);
    }

    /// @dev Adds an entry to the pending payout, first paying (or restoring) the pending one if the
    ///      token or recipient changes, or if the sum would overflow (only a lying token's could).
    ///      Returns how many entries that earlier payout settled.
    function _queue(
        Payout memory payout,
        address token,
        address to,
        uint256 amount,
        uint256 queued,
        bytes32[] memory ids,
        bytes32[] memory hashes
    ) private returns (uint256 paid) {
        if (payout.token != token || payout.to != to || payout.amount > type(uint256).max - amount) {
            paid = _payOrRestore(payout, queued, ids, hashes);
            payout.token = token;
            payout.to = to;
            payout.amount = 0;
            payout.first = queued;
        }
        payout.amount += amount;
    }

    /// @dev Pays the pending batch payout (entries `payout.first` to `end` of the queue) and emits
    ///      their `Delivered` (when `hashes` is non-empty) or `Refunded` events; if the token refuses,
    ///      puts them back to Held and emits `PayoutFailed`. Returns how many entries it settled.
    function _payOrRestore(Payout memory payout, uint256 end, bytes32[] memory ids, bytes32[] memory hashes)
        private
        returns (uint256 paid)
    {
        if (end == payout.first) return 0;
        // The token must get its full allowance, so that its failure is its own, never starvation.
        _requireGas(PAYOUT_GAS_NEEDED);
        (, bool ok) = _transfer(payout.token, payout.to, payout.amount, PAYOUT_GAS);
        if (ok) {
            for (uint256 k = payout.first; k < end; ++k) {
                if (hashes.length != 0) emit Delivered(ids[k], hashes[k]);
                else emit Refunded(ids[k], msg.sender);
            }
            return end - payout.first;
        }
        for (uint256 k = payout.first; k < end; ++k) {
            _setState(ids[k], HELD);
        }
        emit PayoutFailed(payout.token, payout.to, payout.amount);
    }

    /// @dev Sends the pending `settleMany` payout, if any; reverts if the token refuses.
    function _flush(Payout memory payout) private {
        if (payout.amount != 0) {
            _send(payout.token, payout.to, payout.amount);
            payout.amount = 0;
        }
    }

    /// @dev Pulls the payment with the signature encoding the token understands best; false if the
    ///      token refused. `gasLimit`: `ALL_GAS` for a single payment; `PULL_GAS` for a batch's, each
    ///      call checked first to get all of it. No return data is copied; `_bubbleRevert` reads the last call's.
    function _pull(
        Terms calldata t,
        uint256 validAfter,
        uint256 validBefore,
        bytes calldata signature,
        bytes32 id,
        uint256 gasLimit
    ) private returns (bool ok) {
        address token = _tokenOf(t);
        address buyer = _buyerOf(t);
        uint256 amount = t.amount;
        bool capped = gasLimit != ALL_GAS;
        if (signature.length == 65) {
            // The (v, r, s) form exists on every ERC-3009 token; the bytes form only on newer ones.
            if (capped) _requireGas(PULL_GAS_NEEDED);
            bytes4 selector = RECEIVE_VRS_SELECTOR;
            assembly ("memory-safe") {
                let m := mload(0x40)
                mstore(m, selector)
                mstore(add(m, 0x04), buyer)
                mstore(add(m, 0x24), address())
                mstore(add(m, 0x44), amount)
                mstore(add(m, 0x64), validAfter)
                mstore(add(m, 0x84), validBefore)
                mstore(add(m, 0xa4), id)
                mstore(add(m, 0xc4), byte(0, calldataload(add(signature.offset, 0x40))))
                calldatacopy(add(m, 0xe4), signature.offset, 0x40)
                ok := call(gasLimit, token, 0, m, 0x124, 0, 0)
            }
            // An EIP-1271 wallet's 65-byte signature is no ECDSA signature by the wallet's address, and some
            // tokens (FiatToken before v2.2) check the (v, r, s) form by ecrecover alone: a contract payer
            // whose pull failed gets the bytes form too. No cost unless the first form failed.
            if (ok || buyer.code.length == 0) return ok;
        }
        bytes memory data = _bytesPullData(t, validAfter, validBefore, signature, id);
        if (capped) _requireGas(PULL_GAS_NEEDED);
        assembly ("memory-safe") {
            ok := call(gasLimit, token, 0, add(data, 0x20), mload(data), 0, 0)
        }
    }

    /// @dev Calldata of `receiveWithAuthorization` with the signature as bytes.
    function _bytesPullData(
        Terms calldata t,
        uint256 validAfter,
        uint256 validBefore,
        bytes calldata signature,
        bytes32 id
    ) private view returns (bytes memory) {
        return abi.encodeWithSelector(
            RECEIVE_BYTES_SELECTOR, _buyerOf(t), address(this), t.amount, validAfter, validBefore, id, signature
        );
    }

    /// @dev Whether the token says `who` holds less than `amount`. A token that does not answer with a
    ///      word (or burns the small allowance given) is let through to the pull, which decides.
    function _balanceBelow(address token, address who, uint256 amount) private view returns (bool below) {
        bytes4 selector = BALANCE_OF_SELECTOR;
        uint256 gasLimit = BALANCE_GAS;
        assembly ("memory-safe") {
            let m := mload(0x40)
            mstore(m, selector)
            mstore(add(m, 0x04), who)
            let ok := staticcall(gasLimit, token, m, 0x24, 0, 0x20)
            below := and(and(ok, gt(returndatasize(), 31)), lt(mload(0), amount))
        }
    }

    /// @dev ERC-20 transfer that reverts with `TransferFailed` unless the token transferred.
    function _send(address token, address to, uint256 amount) private {
        (bool called, bool ok) = _transfer(token, to, amount, ALL_GAS);
        // A revert's data is the token's reason (a blacklist, a refused re-entry); a `false` has none.
        if (!ok) revert TransferFailed(token, to, amount, called ? bytes("") : _returnData());
    }

    /// @dev ERC-20 transfer giving the token at most `gasLimit`. `called`: the call did not revert;
    ///      `ok`: it also returned nothing (USDT-style) or a 32-byte word equal to 1, not false or a
    ///      short answer. Copies at most one word of what the token returns.
    function _transfer(address token, address to, uint256 amount, uint256 gasLimit)
        private
        returns (bool called, bool ok)
    {
        bytes4 selector = TRANSFER_SELECTOR;
        assembly ("memory-safe") {
            let m := mload(0x40)
            mstore(m, selector)
            mstore(add(m, 0x04), to)
            mstore(add(m, 0x24), amount)
            called := call(gasLimit, token, 0, m, 0x44, 0, 0x20)
            ok := and(called, or(iszero(returndatasize()), and(gt(returndatasize(), 31), eq(mload(0), 1))))
        }
    }

    /// @dev Reverts unless `needed` gas is left (see `InsufficientGas`).
    function _requireGas(uint256 needed) private view {
        if (gasleft() < needed) revert InsufficientGas(needed, gasleft());
    }

    /// @dev The last call's return data.
    function _returnData() private pure returns (bytes memory data) {
        assembly ("memory-safe") {
            data := mload(0x40)
            mstore(data, returndatasize())
            returndatacopy(add(data, 0x20), 0, returndatasize())
            mstore(0x40, add(add(data, 0x20), and(add(returndatasize(), 0x1f), not(0x1f))))
        }
    }

    /// @dev Reverts with the last call's return data: the token's own error.
    function _bubbleRevert() private pure {
        assembly ("memory-safe") {
            let m := mload(0x40)
            returndatacopy(m, 0, returndatasize())
            revert(m, returndatasize())
        }
    }
}
