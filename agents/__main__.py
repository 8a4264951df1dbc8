"""`python -m hivemesh.agents <agent>`: the same as `python -m hivemesh.agents.run <agent>`."""

from __future__ import annotations

import sys

from hivemesh.agents.run import main

if __name__ == "__main__":
    sys.exit(main())
