"""The audit log's tail cannot be cut unnoticed (issue 10): an export is compared with the signed heads the
control plane issues, so cutting its last entry, its last 10, or its trailing checkpoints with the entries they
covered is reported with what is missing; verify refuses to say OK without a trusted key, and refuses a head
signed by another key. Real control plane over the session etcd, real SDK calls, the real CLI."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from hivemesh.controlplane.audit import public_key_pem
from hivemesh.controlplane.audit.heads import sign_head
from hivemesh.sdk import AgentServer, AgentServerConfig, MeshClient
from hivemesh.v1 import audit_pb2
from tests.support.agents_for_tests import EchoAgent
from tests.support.cli_zygote import run_hivemesh
from tests.support.meshenv import MeshEnv, run_cli


async def _calls(mesh: MeshClient, n: int) -> None:
    for i in range(n):
        await mesh.call("echo", {"text": f"hi {i}"}, timeout=10)


def _cut(src: Path, dst: Path, *, entries: int, checkpoints: int | None = None) -> None:
    """A copy of the export src in dst with its last `entries` entries (and its checkpoints past `checkpoints`)
    removed: what someone who can write the archive would do."""
    shutil.copytree(src, dst)
    lines = (src / "log.jsonl").read_bytes().splitlines()
    (dst / "log.jsonl").write_bytes(b"".join(x + b"\n" for x in lines[: len(lines) - entries]))
    if checkpoints is not None:
        cps = (src / "checkpoints.jsonl").read_bytes().splitlines()[:checkpoints]
        (dst / "checkpoints.jsonl").write_bytes(b"".join(x + b"\n" for x in cps))


async def _verify(env: MeshEnv, *args: str) -> tuple[int, dict[str, Any], str]:
    code, out, err = await run_cli(env, "audit", "verify", "--json", *args)
    assert out.strip(), err
    return code, json.loads(out.splitlines()[-1]), err


async def test_a_cut_tail_or_cut_trailing_checkpoints_are_reported(mesh_env: MeshEnv, tmp_path: Path) -> None:
    async with AgentServer(EchoAgent(), await mesh_env.settings_for("echo"),
                           AgentServerConfig(audit_dir=tmp_path / "spools")) as server:
        async with MeshClient.connect(name="tester", settings=await mesh_env.settings_for("tester", "client")) as mesh:
            assert await mesh.node.registry.wait_for_capability("echo", 1, timeout=10)
            for _ in range(3):  # three checkpoints, each with entries after it
                await _calls(mesh, 6)
                assert server.audit is not None and server.audit.shipper is not None
                assert await server.audit.shipper.wait_shipped(timeout=10)
                await mesh_env.operator.call(mesh_env.operator.audit.CreateCheckpoint,
                                             audit_pb2.CreateCheckpointRequest())
            await _calls(mesh, 12)
            assert await server.audit.shipper.wait_shipped(timeout=10)

    export = tmp_path / "export"
    code, out, err = await run_cli(mesh_env, "audit", "export", "--out", str(export))
    assert code == 0, err
    entries = (export / "log.jsonl").read_bytes().splitlines()
    cps = [json.loads(c) for c in (export / "checkpoints.jsonl").read_bytes().splitlines()]
    head = json.loads((export / "head.json").read_bytes())
    last = len(entries)
    assert len(cps) == 3 and head["log_seq"] == last and head["checkpoints"] == 3 and head["export"] is True
    assert last - int(cps[-1]["log_seq"]) >= 12, "entries after the last checkpoint: no checkpoint covers them"

    # (d) The untouched export verifies OK, with the key certified by the mesh CA the operator trusts.
    code, rep, err = await _verify(mesh_env, "--file", str(export))
    assert code == 0 and rep["ok"] is True and rep["signatures_checked"] is True, (rep, err)
    assert rep["signed_head"] == head["head_no"] and rep["head_seq"] == last
    code, out, err = await run_cli(mesh_env, "audit", "verify", "--file", str(export))
    assert code == 0 and "OK" in out and f"signed head {head['head_no']} covers it" in out, out + err

    # (a) The last entry cut: reported as that seq, 1 entry.
    _cut(export, tmp_path / "cut1", entries=1)
    code, rep, err = await _verify(mesh_env, "--file", str(tmp_path / "cut1"))
    assert code == 1 and rep["ok"] is False, rep
    assert (rep["missing_first_seq"], rep["missing_last_seq"], rep["missing_entries"]) == (last, last, 1), rep
    assert f"seq {last}..{last} (1 entry)" in rep["problem"], rep
    code, out, err = await run_cli(mesh_env, "audit", "verify", "--file", str(tmp_path / "cut1"))
    assert code == 1 and "TAMPERED" in err and "missing entries" in err, out + err

    # (b) The last 10 cut.
    _cut(export, tmp_path / "cut10", entries=10)
    code, rep, err = await _verify(mesh_env, "--file", str(tmp_path / "cut10"))
    assert code == 1, rep
    assert (rep["missing_first_seq"], rep["missing_last_seq"], rep["missing_entries"]) == (last - 9, last, 10)
    assert rep["missing_checkpoints"] == [], rep

    # (c) The last two checkpoints removed with every entry they (and the cut tail) covered.
    keep = int(cps[0]["log_seq"])
    _cut(export, tmp_path / "cutcp", entries=last - keep, checkpoints=1)
    code, rep, err = await _verify(mesh_env, "--file", str(tmp_path / "cutcp"))
    assert code == 1, rep
    assert (rep["missing_first_seq"], rep["missing_last_seq"]) == (keep + 1, last), rep
    assert rep["missing_entries"] == last - keep and rep["missing_checkpoints"] == [2, 3], rep
    assert "missing checkpoint(s) 2..3 of 3" in rep["problem"], rep

    # The same cuts against an explicit head kept apart from the folder (no control-plane heads needed).
    kept = tmp_path / "head.json"
    shutil.copy(export / "head.json", kept)
    code, rep, err = await _verify(mesh_env, "--file", str(tmp_path / "cut1"), "--head", str(kept))
    assert code == 1 and rep["missing_entries"] == 1, rep
    code, rep, err = await _verify(mesh_env, "--file", str(export), "--head", str(kept))
    assert code == 0 and rep["ok"] is True, rep

    # (f) A head signed by another key is refused, and so is a key handed in the folder when it is not the
    # control plane's: both verify nothing.
    other = ed25519.Ed25519PrivateKey.generate()
    forged = sign_head(other, {**head, "log_seq": keep, "head": json.loads(entries[keep - 1])["hash"],
                               "count": keep, "checkpoints": 1, "checkpoint_sig": cps[0]["sig"]}, "forged")
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    code, out, err = await run_cli(mesh_env, "audit", "verify", "--file", str(tmp_path / "cutcp"),
                                   "--head", str(tmp_path / "forged.json"))
    assert code == 1 and "refusing" in err and "does not verify with the trusted key" in err, out + err
    # Whoever rewrote the folder could also re-sign its checkpoints with their own key and pass that key: the
    # control plane's heads do not verify with it, so nothing is said OK.
    (tmp_path / "cutcp" / "checkpoint-key.pem").write_text(public_key_pem(other.public_key()))
    code, out, err = await run_cli(mesh_env, "audit", "verify", "--file", str(tmp_path / "cutcp"),
                                   "--key", str(tmp_path / "cutcp" / "checkpoint-key.pem"))
    assert code == 1 and "refusing" in err and "OK" not in out, out + err

    # (e) No trusted key (no --key, and no operator identity to get the CA-certified key with): not OK, and
    # it says that no signature was checked, even though the untouched chain links.
    empty = tmp_path / "no-certs"
    empty.mkdir()
    code, out, err = await _cli_without_identity(empty, "audit", "verify", "--file", str(export))
    assert code == 1 and "no signature was checked" in err and "OK" not in out, out + err
    code, out, err = await _cli_without_identity(empty, "audit", "verify", "--file", str(export), "--json")
    rep = json.loads(out.splitlines()[-1])
    assert code == 1 and rep["ok"] is False and rep["signatures_checked"] is False, rep
    assert "no signature was checked" in rep["untrusted"], rep
    # An explicit head without a key is no better.
    code, out, err = await run_cli(mesh_env, "audit", "verify", "--file", str(export), "--head", str(kept))
    assert code == 0, out + err  # the control plane's certified key is the trusted one here
    code, out, err = await _cli_without_identity(empty, "audit", "verify", "--file", str(export), "--head",
                                                 str(kept))
    assert code == 1 and "no signature was checked" in err, out + err


async def test_the_stored_log_is_compared_with_a_fresh_head(mesh_env: MeshEnv, tmp_path: Path) -> None:
    """Verifying the control plane's own log: the head comes with the download and covers its last entry."""
    code, rep, err = await _verify(mesh_env)  # an empty log: a head at seq 0
    assert code == 0 and rep["ok"] is True, (rep, err)
    await mesh_env.operator.call(mesh_env.operator.audit.Query, audit_pb2.AuditQueryRequest(limit=1))
    code, rep, err = await _verify(mesh_env)
    assert code == 0 and rep["ok"] is True and rep["signed_head"] >= 1 and rep["signatures_checked"], (rep, err)
    assert rep["head_seq"] >= 1


async def test_the_cadence_signs_a_head_soon_after_records_arrive(mesh_env: MeshEnv) -> None:
    """Records arriving (here: operator reads, which the control plane records) get a head within ~1 s."""
    before: audit_pb2.HeadResponse = await mesh_env.operator.call(mesh_env.operator.audit.Head,
                                                                  audit_pb2.HeadRequest())
    seq_before = json.loads(before.latest)["log_seq"] if before.latest else 0
    await mesh_env.operator.call(mesh_env.operator.audit.Query, audit_pb2.AuditQueryRequest(limit=1))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now: audit_pb2.HeadResponse = await mesh_env.operator.call(mesh_env.operator.audit.Head,
                                                                   audit_pb2.HeadRequest())
        if now.latest and json.loads(now.latest)["log_seq"] > seq_before:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("no head covered the new records within 10 s")
    assert now.key_cert_pem.startswith(b"-----BEGIN CERTIFICATE-----")


async def _cli_without_identity(certs_dir: Path, *args: str) -> tuple[int, str, str]:
    """The real CLI with a certs dir holding no operator identity and no trust bundle (nothing to trust)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMESH_")}
    env["HIVEMESH_HOME"] = str(certs_dir / "home")
    return await run_hivemesh(["--certs-dir", str(certs_dir), *args], env)
