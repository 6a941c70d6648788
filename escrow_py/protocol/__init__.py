"""The protocol kernel every role shares: terms and ids, ERC-3009 authorizations, the wire format, errors.

It imports nothing from `escrow_py.chain`, `escrow_py.storage` or a role (tests/test_layout.py
checks it), so a message can be built, encoded, decoded and checked without a node or a database:

    codec.py     the camelCase model base and its field types: the one hex, uint and address rule
    reasons.py   Reason, the one vocabulary of why
    terms.py     Terms, State, escrow_id, request_hash, canonical_url, delivery_hash, the constants
    eip3009.py   Authorization, TokenDomain, the EIP-712 typed data, sign and recover
    wire.py      the x402 v2 envelope of the delivery-escrow scheme and its header codecs
    errors.py    the one exception tree
    tls.py       the one verifying TLS context every HTTP client the package builds shares
"""
