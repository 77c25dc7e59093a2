"""Pytest fixtures: one server per provider per session, reset before each test.

Use from a conftest or test module with ``from providers.fixtures import *``
(or ``pytest_plugins = [...]`` naming this module the way it is importable).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .anthropic_server import AnthropicServer
from .openai_server import OpenAIServer

__all__ = ["anthropic_server", "anthropic_server_session", "openai_server", "openai_server_session"]


@pytest.fixture(scope="session")
def openai_server_session() -> Iterator[OpenAIServer]:
    """The session's OpenAI server (not reset; prefer ``openai_server``)."""
    with OpenAIServer() as server:
        yield server


@pytest.fixture
def openai_server(openai_server_session: OpenAIServer) -> OpenAIServer:
    """The session's OpenAI server, with an empty queue and request log."""
    openai_server_session.reset()
    return openai_server_session


@pytest.fixture(scope="session")
def anthropic_server_session() -> Iterator[AnthropicServer]:
    """The session's Anthropic server (not reset; prefer ``anthropic_server``)."""
    with AnthropicServer() as server:
        yield server


@pytest.fixture
def anthropic_server(anthropic_server_session: AnthropicServer) -> AnthropicServer:
    """The session's Anthropic server, with an empty queue and request log."""
    anthropic_server_session.reset()
    return anthropic_server_session
