"""hivemesh.controlplane."""
