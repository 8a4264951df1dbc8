"""ListEscalations pages. A reply stopped before the 8 MiB message limit and only said how many escalations it left
out, so a few escalations with large JSON hid every older one from operators for good (the SDK's `list`, and with it
`hivemesh escalations list`, returned the first reply). Pages now resume, newest first, after the last escalation
listed (by its etcd create revision, under an opaque token bound to the caller), and the SDK follows them."""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncIterator

import aetcd
import grpc
import pytest

from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.errors import HivemeshError
from hivemesh.mesh.tls import MAX_MESSAGE_BYTES, join
from hivemesh.sdk.escalation import EscalationClient
from hivemesh.v1 import escalation_pb2 as pb
from hivemesh.v1 import escalation_pb2_grpc
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv

LEFT_OFF_HEADER = "hivemesh-left-off"


async def _workload(mesh_env: MeshEnv, name: str) -> ControlPlaneClient:
    token = (await mesh_env.operator.create_join_token(name, "client", 120)).token
    w = await join(mesh_env.controlplane.join_address, mesh_env.certs.ca_cert.read_bytes(), token, name, "client",
                   trust_domain=TRUST_DOMAIN)
    return ControlPlaneClient(mesh_env.controlplane.address, w, TRUST_DOMAIN)


@pytest.fixture
async def workloads(mesh_env: MeshEnv) -> AsyncIterator[tuple[ControlPlaneClient, ControlPlaneClient]]:
    """Two client workloads (not operators), each seeing only its own escalations."""
    first = await _workload(mesh_env, "asker")
    try:
        second = await _workload(mesh_env, "other")
        try:
            yield first, second
        finally:
            await second.close()
    finally:
        await first.close()


async def _page(stub: escalation_pb2_grpc.EscalationsStub, **fields: object) -> tuple[pb.ListEscalationsResponse,
                                                                                       int | None]:
    call = stub.ListEscalations(pb.ListEscalationsRequest(**fields), timeout=30)  # type: ignore[arg-type]
    page = await call
    left = dict(await call.trailing_metadata() or ()).get(LEFT_OFF_HEADER)
    return page, None if left is None else int(left)


async def _refused(call: object, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call  # type: ignore[misc]
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert field in (refused.value.details() or ""), refused.value.details()


async def test_pages_resume_newest_first_without_repeats_or_gaps_while_escalations_change(
    mesh_env: MeshEnv, etcd: aetcd.Client
) -> None:
    stub = escalation_pb2_grpc.EscalationsStub(mesh_env.operator.channel)
    ids = [f"e-{i:02d}" for i in range(23)]
    for esc_id in ids:  # one at a time: stored in this order
        await stub.CreateEscalation(pb.CreateEscalationRequest(id=esc_id, reason="approve", workflow_id="wf"),
                                    timeout=10)
    newest_first = ids[::-1]

    listed: list[str] = []
    statuses: dict[str, int] = {}
    token, pages = "", 0
    changes = iter([  # what happens after each page: e-03 and e-01 are not listed yet, e-21 already is
        [("resolve", "e-03"), ("create", "late-1")], [("delete", "e-10")], [("resolve", "e-21")],
        [("create", "late-2"), ("delete", "e-01")],
    ])
    while True:
        page, left_off = await _page(stub, workflow_id="wf", page_size=4, page_token=token)
        pages += 1
        assert 1 <= len(page.escalations) <= 4
        listed += [e.id for e in page.escalations]
        statuses.update({e.id: e.status for e in page.escalations})
        token = page.next_page_token
        if not token:
            assert left_off is None  # the last page says nothing of leaving out
            break
        assert left_off is not None and left_off > 0  # how many matching come after this page
        for what, esc_id in next(changes, []):
            if what == "resolve":
                await stub.ResolveEscalation(pb.ResolveEscalationRequest(id=esc_id, approve=True), timeout=10)
            elif what == "create":
                await stub.CreateEscalation(pb.CreateEscalationRequest(id=esc_id, reason="later", workflow_id="wf"),
                                            timeout=10)
            else:  # as retention deletes a resolved one
                assert await etcd.delete(f"/hivemesh/escalations/{esc_id}".encode())

    assert len(listed) == len(set(listed)), f"listed twice: {listed}"
    # Every escalation there when paging began, in order, except the ones deleted before their page came; the
    # ones created meanwhile are newer than the first page, so a fresh listing shows them, this one does not.
    assert listed == [i for i in newest_first if i not in ("e-10", "e-01")]
    assert pages == 6
    assert statuses["e-03"] == pb.ESCALATION_STATUS_APPROVED  # resolved before its page: listed as it is now
    assert statuses["e-21"] == pb.ESCALATION_STATUS_PENDING  # resolved after its page: listed once, as it was

    # Filters apply within pages: only pending ones, in the same order, however the pages fall.
    pending: list[str] = []
    token = ""
    while True:
        page, _ = await _page(stub, status=pb.ESCALATION_STATUS_PENDING, page_size=3, page_token=token)
        pending += [e.id for e in page.escalations]
        token = page.next_page_token
        if not token:
            break
    gone = ("e-10", "e-01", "e-03", "e-21")
    assert pending == ["late-2", "late-1", *(i for i in newest_first if i not in gone)]

    # page_size 0 (a caller from before paging) gets them all at once, and a huge one is read as the maximum.
    for size in (0, 2**31 - 1):
        page, left_off = await _page(stub, page_size=size)
        assert len(page.escalations) == 23 and not page.next_page_token and left_off is None


async def test_sdk_list_follows_pages_past_one_message(
    mesh_env: MeshEnv, workloads: tuple[ControlPlaneClient, ControlPlaneClient]
) -> None:
    asker, other = workloads
    big = {"a": "x" * (250 * 1024)}
    count = 18  # x 2 documents of 250 KiB: past one 8 MiB message
    mine = EscalationClient(asker, timeout_s=30)
    for i in range(count):
        await mine.create("approve", big, escalation_id=f"big-{i:02d}", on_deadline="default", default_answer=big)
    theirs = EscalationClient(other)
    await theirs.create("not yours", escalation_id="theirs-1")
    operator = EscalationClient(mesh_env.operator, timeout_s=30)
    await operator.create("the operator's own", escalation_id="ops-1")

    first, left_off = await _page(escalation_pb2_grpc.EscalationsStub(asker.channel))
    assert first.next_page_token and left_off and len(first.escalations) + left_off == count  # one page is short
    assert first.ByteSize() < MAX_MESSAGE_BYTES

    got = await mine.list()
    assert [e.id for e in got] == [f"big-{i:02d}" for i in reversed(range(count))]  # all, each once, newest first
    assert all(e.context == big and e.default_answer == big for e in got)  # whole, never cut
    assert sum(len(e.context["a"]) + len(e.default_answer["a"]) for e in got) > 8 * 1024 * 1024
    assert [e.id for e in await theirs.list()] == ["theirs-1"]  # a workload still sees only its own
    everyone = await operator.list("PENDING")  # what `hivemesh escalations list` shows
    assert [e.id for e in everyone] == ["ops-1", "theirs-1", *(e.id for e in got)]
    assert await operator.list(workflow_id="no-such-run") == []

    with pytest.raises(HivemeshError) as too_long:  # bounded: a listing past max_pages is an error, not a loop
        await mine.list(max_pages=1)
    assert too_long.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1 pages" in too_long.value.message


async def test_malformed_and_foreign_page_tokens_and_negative_page_size_are_invalid_argument(
    mesh_env: MeshEnv, workloads: tuple[ControlPlaneClient, ControlPlaneClient]
) -> None:
    asker, other = workloads
    asker_stub = escalation_pb2_grpc.EscalationsStub(asker.channel)
    other_stub = escalation_pb2_grpc.EscalationsStub(other.channel)
    operator = escalation_pb2_grpc.EscalationsStub(mesh_env.operator.channel)
    for i in range(3):
        await asker_stub.CreateEscalation(pb.CreateEscalationRequest(id=f"a-{i}", reason="approve"), timeout=10)
    page, _ = await _page(asker_stub, page_size=1)
    token = page.next_page_token
    assert token and [e.id for e in page.escalations] == ["a-2"]

    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    version_2 = base64.urlsafe_b64encode(b"\x02" + raw[1:]).rstrip(b"=").decode()
    for bad in ("not a token", "AAAA", token[:-2], token + "AA", version_2, "x" * 5000, "é"):
        await _refused(asker_stub.ListEscalations(pb.ListEscalationsRequest(page_token=bad), timeout=10),
                       "page_token")
    # Another caller's token (a workload's, or an operator's) is refused, whoever presents it.
    await _refused(other_stub.ListEscalations(pb.ListEscalationsRequest(page_token=token), timeout=10),
                   "page_token")
    await _refused(operator.ListEscalations(pb.ListEscalationsRequest(page_token=token), timeout=10), "page_token")
    ops_page, _ = await _page(operator, page_size=1)
    assert ops_page.next_page_token
    await _refused(asker_stub.ListEscalations(pb.ListEscalationsRequest(page_token=ops_page.next_page_token),
                                              timeout=10), "page_token")
    forged = base64.urlsafe_b64encode(struct.pack(">B8sQ", 1, b"\0" * 8, 10**6)).rstrip(b"=").decode()
    await _refused(asker_stub.ListEscalations(pb.ListEscalationsRequest(page_token=forged), timeout=10),
                   "page_token")

    for size in (-1, -(2**31)):
        await _refused(asker_stub.ListEscalations(pb.ListEscalationsRequest(page_size=size), timeout=10),
                       "page_size")
    # The caller's own token still works after all that.
    rest, left_off = await _page(asker_stub, page_token=token)
    assert [e.id for e in rest.escalations] == ["a-1", "a-0"] and not rest.next_page_token and left_off is None
