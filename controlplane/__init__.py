"""hivemesh.controlplane: the control plane (CA, token issuer, joins, grants, the policy store, its server).

It depends on `hivemesh.mesh` and `hivemesh.v1` only (an import-linter contract). Import from its modules:
`server` (ControlPlaneServer, ControlPlaneConfig, main), `ca` (init_ca), `policies` (the store and its KINDS).
The operator's command line lives in the `cli` subpackage, which nothing here imports.
"""
