"""hivemesh.sdk."""
