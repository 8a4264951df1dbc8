"""Rigs, attack helpers and child-process mains shared by the unit, integration and e2e tests."""
