"""`python -m hivemesh.controlplane.cli ...`: what `hivemesh up`, the benchmark and the tests spawn."""

from hivemesh.controlplane.cli import main

main()
