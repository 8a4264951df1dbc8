"""The A2A bridge, both directions, on the official `a2a-sdk` (the optional extra `hivemesh[a2a]`).

- `A2AGateway` serves every mesh agent as an A2A agent over HTTPS (agent cards from the registry, JSON-RPC
  `message/send` and `message/stream` onto Invoke and InvokeStream), calling as the A2A caller through the
  gateway's own MeshClient, so authorization, rate limits, breakers and audit apply to that caller.
- `A2ABridgeAgent` is the other way: an external A2A agent, known by its card URL, served on the mesh as an SDK
  agent whose capabilities are the card's skills.

Names and states are A2A's (DESIGN.md "Names shared with A2A"); see docs/a2a.md.
"""

from hivemesh.sdk.a2a.bridge import A2ABridgeAgent, fetch_card
from hivemesh.sdk.a2a.gateway import A2AGateway, GatewayConfig

__all__ = ["A2ABridgeAgent", "A2AGateway", "GatewayConfig", "fetch_card"]
