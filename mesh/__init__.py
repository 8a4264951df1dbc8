"""hivemesh.mesh."""
