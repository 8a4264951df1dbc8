"""Every hivemesh module imports as the first hivemesh module a program imports.

A cycle through a package's `__init__` fails only in one import order: `hivemesh.mesh.shadow` imported
`hivemesh.mesh.outbound.call`, whose package `__init__` imports the pipeline, which imported the shadow module back
while it was half-built (ImportError), yet every test passed, because each imported something else first.
import-linter does not see it (its graph has no edge from a module to its package's `__init__`). So each module
is imported here from a state with no hivemesh module loaded but the generated protos (which protobuf's
descriptor pool cannot load twice), in one child process so that this process's modules are left alone.
"""

from __future__ import annotations

import json
import subprocess
import sys

_SWEEP = r"""
import importlib, json, pkgutil, sys, traceback
tops = ("hivemesh.mesh", "hivemesh.sdk", "hivemesh.controlplane", "hivemesh.agents")
names = []
for top in tops:
    names.append(top)
    names += [m.name for m in pkgutil.walk_packages(importlib.import_module(top).__path__, top + ".")
              if not m.name.endswith(".__main__")]  # a __main__ runs its program when imported
import hivemesh.v1.agent_pb2, hivemesh.v1.mesh_pb2  # noqa: E401
kept = {k for k in sys.modules if k == "hivemesh" or k.startswith("hivemesh.v1")}
failed = {}
for name in names:
    for loaded in [k for k in sys.modules if k.startswith("hivemesh.") and k not in kept]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failed[name] = traceback.format_exc(limit=-3)
print(json.dumps({"names": names, "failed": failed}))
"""


def test_every_module_imports_first() -> None:
    out = subprocess.run([sys.executable, "-c", _SWEEP], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    names = result["names"]
    assert len(names) > 200, f"the sweep found only {len(names)} modules: {names[:10]}"
    for expected in ("hivemesh.mesh.outbound.shadow", "hivemesh.sdk.client", "hivemesh.controlplane.server"):
        assert expected in names
    assert not result["failed"], "\n\n".join(f"{name}:\n{tb}" for name, tb in result["failed"].items())
