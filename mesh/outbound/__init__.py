"""The outbound side of the mesh: a call by capability name to a live instance, with every traffic policy.

Public names: `OutboundPipeline` (the pipeline a MeshNode owns), `encode_request` (serialize a request once,
at the edge), `DEGRADED_KEY` (marks a fallback or cached answer). Modules, one concern each: `pipeline`,
`call`, `selection`, `attempts`, `degrade`, `shadow`, `channels`.
"""

from hivemesh.mesh.outbound.call import encode_request
from hivemesh.mesh.outbound.degrade import DEGRADED_KEY
from hivemesh.mesh.outbound.pipeline import OutboundPipeline

__all__ = ["DEGRADED_KEY", "OutboundPipeline", "encode_request"]
