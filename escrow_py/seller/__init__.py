"""The seller's side: verify a delivery-escrow payment before depositing it.

So far this package holds the verification every paid request goes through
(`verify_offchain`, then `verify_onchain`); the ASGI middleware that prices routes,
deposits, serves, and posts delivery hashes builds on it.

    EscrowError
    └── ProtocolError
        └── PaymentRejected     a rule broken: `.reason` (wire.Reason) and `.status` (400 or 402)
"""

from escrow_py.seller._verify import PaymentRejected, VerifiedPayment, offer_for, verify_offchain, verify_onchain

__all__ = ["PaymentRejected", "VerifiedPayment", "offer_for", "verify_offchain", "verify_onchain"]
