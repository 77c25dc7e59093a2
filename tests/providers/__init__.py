"""Local look-alikes of the OpenAI and Anthropic HTTP APIs for tests with the real LangChain clients.

Use the pytest fixtures in ``providers.fixtures`` (``openai_server``,
``anthropic_server``); see ``providers.common`` for the scripting conventions.
"""

from .anthropic_server import AnthropicServer
from .common import RecordedRequest, Reply, ToolCall, count_output_tokens, count_prompt_tokens
from .openai_server import OpenAIServer

__all__ = [
    "AnthropicServer",
    "OpenAIServer",
    "RecordedRequest",
    "Reply",
    "ToolCall",
    "count_output_tokens",
    "count_prompt_tokens",
]
