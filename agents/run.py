"""Run one reference agent as its own process: `python -m hivemesh.agents.run <agent>`.

    python -m hivemesh.agents.run ocr            # SDK agents: in-process mesh layers, settings from
    python -m hivemesh.agents.run extractor      # HIVEMESH_* variables or the `hivemesh up` state file
    python -m hivemesh.agents.run storage        # (see MeshSettings.resolve)
    python -m hivemesh.agents.run validator --listen 127.0.0.1:7001   # plain gRPC; front it with a sidecar

SDK agents are imported only when chosen, so `validator` runs with no hivemesh runtime loaded at all.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SDK_AGENTS = {
    "ocr": ("hivemesh.agents.ocr", "OcrAgent"),
    "extractor": ("hivemesh.agents.extract", "ExtractorAgent"),
    "storage": ("hivemesh.agents.store", "StorageAgent"),
}
PLAIN_AGENTS = {"validator": "hivemesh.agents.validate_plain"}
AGENT_NAMES = (*SDK_AGENTS, *PLAIN_AGENTS)


def main(argv: Sequence[str] | None = None) -> int:
    from hivemesh.controlplane.procs import die_with_parent_if_asked  # stdlib only: no runtime for 'validator'

    die_with_parent_if_asked()
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in PLAIN_AGENTS:
        plain = importlib.import_module(PLAIN_AGENTS[args[0]])
        return int(plain.main(args[1:]))
    parser = argparse.ArgumentParser(
        prog="python -m hivemesh.agents.run",
        description="Run a hivemesh reference agent until SIGINT/SIGTERM.",
        epilog="'validator' takes the options of python -m hivemesh.agents.validate_plain.",
    )
    parser.add_argument("agent", choices=AGENT_NAMES)
    parser.add_argument("--host", default="127.0.0.1", help="address to serve and advertise (default %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    parser.add_argument("--instance-id", default=None, help="registry instance id (default: generated)")
    parsed = parser.parse_args(args)

    from hivemesh.sdk import MeshSettings, run

    try:
        settings = MeshSettings.resolve()
    except ValueError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    module, cls_name = SDK_AGENTS[parsed.agent]
    agent = getattr(importlib.import_module(module), cls_name)()
    run(agent, settings, host=parsed.host, port=parsed.port, instance_id=parsed.instance_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
