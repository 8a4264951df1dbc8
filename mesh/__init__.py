"""hivemesh.mesh: the data plane (identity, inbound layers, outbound pipeline, registry, policies, sidecar).

It imports nothing of the SDK, the agents or the control plane (an import-linter contract). Import what you
need from its modules: `node.MeshNode` (a process's membership), `sidecar`, `errors` (the typed errors),
`settings.MeshSettings`, `policy` (kinds and the cache), `controlplane_client.ControlPlaneClient`. This file
imports nothing, so a stdlib-only module such as `lifeline` stays cheap to import.
"""
