"""A delivery-escrow facilitator: the operator key and the chain behind an HTTP API for keyless sellers.

    facilitator = Facilitator(FacilitatorConfig(rpc_url=..., escrow=..., token=..., network=..., operator=signer))
    app = create_app(facilitator, KeyStore("facilitator.sqlite"))      # an ASGI app for uvicorn

or `x402-escrow facilitator serve`. A seller points `FacilitatorSellerConfig` (escrow_py.seller)
at it with an API key from `x402-escrow facilitator keys create`.
"""

from __future__ import annotations

from escrow_py.facilitator._app import create_app
from escrow_py.facilitator._config import FacilitatorConfig
from escrow_py.facilitator._keys import ApiKey, KeyStore
from escrow_py.facilitator._metrics import FacilitatorMetrics
from escrow_py.facilitator._service import Facilitator, FacilitatorError

__all__ = [
    "ApiKey",
    "Facilitator",
    "FacilitatorConfig",
    "FacilitatorError",
    "FacilitatorMetrics",
    "KeyStore",
    "create_app",
]
