"""Workflow definitions the durable-workflow tests run (importable by reference, so any process can resume them)."""

from __future__ import annotations

from typing import Any

from hivemesh.sdk.patterns import Runner


async def charge_flow(run: Runner, inp: dict[str, Any]) -> dict[str, Any]:
    """normalize (idempotent) → charge-1 (NOT idempotent) → charge-2 (NOT idempotent)."""
    account = (await run.step("normalize", "upper", {"text": inp["account"]})).output["text"]
    first = await run.step("charge-1", "charge", {"account": account, "amount": 10.0, "delay": inp.get("delay", 0.0)})
    second = await run.step("charge-2", "charge", {"account": account, "amount": 5.0})
    return {"account": account, "receipts": [first.output["receipt"], second.output["receipt"]]}


async def nap_flow(run: Runner, inp: dict[str, Any]) -> dict[str, Any]:
    """One long call through a relay agent (relay → nap), to see cancellation travel down the chain."""
    out = await run.step("relay", "relay-nap", {"seconds": inp.get("seconds", 30.0), "tag": inp.get("tag", "wf")})
    return {"slept": out.output}
