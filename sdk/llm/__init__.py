"""Language models behind one small interface, offline by default.

    llm = llm_from_env()                       # RuleBasedLLM unless HIVEMESH_LLM=openai
    done = await llm.complete("Summarize: ...", task="summarize")
    done.text, done.usage.input_tokens, done.usage.output_tokens
    turn = await llm.chat(messages, tools=specs)   # text or tool calls (hivemesh.sdk.tools runs the loop)

The default, `RuleBasedLLM` (rules.py), is deterministic and needs no network, tool calls included.
`OpenAICompatibleLLM` (openai_compat.py) uses the official `openai` package against any OpenAI-compatible
endpoint; it is chosen by configuration (`HIVEMESH_LLM=openai`, `HIVEMESH_LLM_BASE_URL`, `HIVEMESH_LLM_MODEL`,
key in `HIVEMESH_LLM_API_KEY` or `OPENAI_API_KEY`, optional `HIVEMESH_LLM_TIMEOUT_S`,
`HIVEMESH_LLM_MAX_RETRIES`). `TieredLLM` sends simple prompts to a smaller model. Usage accounting: core.py.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from hivemesh.mesh.errors import InvalidInputError
from hivemesh.sdk.llm.core import (
    LLM,
    ChatModel,
    ChatTurn,
    Completion,
    Message,
    TieredLLM,
    ToolCall,
    Usage,
    UsageMeter,
    count_tokens,
    metering,
    record_usage,
)
from hivemesh.sdk.llm.openai_compat import OpenAICompatibleLLM, OpenAIConfig
from hivemesh.sdk.llm.rules import Rule, RuleBasedLLM


def llm_from_env(rules: Mapping[str, Rule] | None = None,
                 env: Mapping[str, str] | None = None) -> RuleBasedLLM | OpenAICompatibleLLM:
    """The model configuration says: `HIVEMESH_LLM` = `rules` (default, offline) or `openai`.

    Raises:
        InvalidInputError: for an unknown HIVEMESH_LLM or an incomplete or invalid OpenAI configuration.
    """
    e = os.environ if env is None else env
    kind = (e.get("HIVEMESH_LLM") or "rules").strip().lower()
    if kind == "rules":
        return RuleBasedLLM(rules)
    if kind == "openai":
        base = e.get("HIVEMESH_LLM_BASE_URL") or "https://api.openai.com/v1"
        model = e.get("HIVEMESH_LLM_MODEL") or ""
        key = e.get("HIVEMESH_LLM_API_KEY") or e.get("OPENAI_API_KEY") or ""
        try:
            timeout = float(e.get("HIVEMESH_LLM_TIMEOUT_S") or 60.0)
            retries = int(e.get("HIVEMESH_LLM_MAX_RETRIES") or 2)
            return OpenAICompatibleLLM(OpenAIConfig(base_url=base, model=model, api_key=key, timeout_s=timeout,
                                                    max_retries=retries))
        except ValueError as exc:
            hint = "set HIVEMESH_LLM_MODEL, HIVEMESH_LLM_BASE_URL; timeout and retries are numbers"
            raise InvalidInputError(f"HIVEMESH_LLM=openai: {exc} ({hint})") from None
    raise InvalidInputError(f"HIVEMESH_LLM must be 'rules' or 'openai', not {kind!r}")


__all__ = [
    "LLM",
    "ChatModel",
    "ChatTurn",
    "Completion",
    "Message",
    "OpenAICompatibleLLM",
    "OpenAIConfig",
    "Rule",
    "RuleBasedLLM",
    "TieredLLM",
    "ToolCall",
    "Usage",
    "UsageMeter",
    "count_tokens",
    "llm_from_env",
    "metering",
    "record_usage",
]
