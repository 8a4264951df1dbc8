"""hivemesh.agents."""
