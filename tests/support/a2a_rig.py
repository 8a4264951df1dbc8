"""What the A2A tests share: an HTTPS client holding a mesh identity, as any A2A caller with one would."""

from __future__ import annotations

import ssl
import uuid
from pathlib import Path
from typing import Any

import httpx
from a2a.helpers import new_data_part, new_text_part
from a2a.types import Message, Role, SendMessageRequest
from google.protobuf import struct_pb2
from google.protobuf.json_format import ParseDict

from hivemesh.mesh.tls import Workload
from hivemesh.sdk import Agent, Context, capability


def https_client(workload: Workload | None, ca_pem: bytes, folder: Path, token: str | None) -> httpx.AsyncClient:
    """httpx over TLS trusting the mesh CA (the gateway's certificate names a SPIFFE id, not a host name),
    presenting workload's certificate (None: none) and a bearer token (None: none)."""
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    ctx.check_hostname = False
    if workload is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cert.pem").write_bytes(workload.cert_pem)
        (folder / "key.pem").write_bytes(workload.key_pem)
        ctx.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(verify=ctx, headers=headers, timeout=30)


def message(payload: Any, *, skill: str | None = None, task_id: str = "", context_id: str = "") -> Message:
    part = new_text_part(payload) if isinstance(payload, str) else new_data_part(payload)
    msg = Message(role=Role.ROLE_USER, message_id=str(uuid.uuid4()), parts=[part], task_id=task_id,
                  context_id=context_id)
    if skill is not None:
        msg.metadata.CopyFrom(ParseDict({"skill": skill}, struct_pb2.Struct()))
    return msg


def send_request(payload: Any, **kw: Any) -> SendMessageRequest:
    return SendMessageRequest(message=message(payload, **kw))


class WhoAgent(Agent):
    """Tells whom a call was made for and through whom (the delegation chain a gateway call carries)."""

    name = "who"

    @capability(description="Whom this call is for", idempotent=True)
    async def whoami(self, req: dict[str, Any], ctx: Context) -> dict[str, Any]:
        return {"principal": ctx.principal, "chain": list(ctx.chain), "caller": ctx.caller}
