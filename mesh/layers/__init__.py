"""The data plane's layers, one concern each. `hivemesh.mesh.inbound` assembles them in order."""

from hivemesh.mesh.layers.authn import TokenLayer
from hivemesh.mesh.layers.base import Inbound, InboundLayer, SettlingLayer
from hivemesh.mesh.layers.budget import BudgetLayer
from hivemesh.mesh.layers.guard import InputGuardLayer
from hivemesh.mesh.layers.identity import PeerIdentityLayer

__all__ = ["BudgetLayer", "Inbound", "InboundLayer", "InputGuardLayer", "PeerIdentityLayer", "SettlingLayer",
           "TokenLayer"]
