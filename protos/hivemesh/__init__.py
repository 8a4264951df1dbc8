"""hivemesh: a gRPC agent mesh with a sidecar control plane.

Import what you need from the curated packages: `hivemesh.sdk` to write agents and call the mesh,
`hivemesh.mesh` for the data plane, `hivemesh.controlplane` for the control plane and the CLI.
"""

__version__ = "0.1.0"
