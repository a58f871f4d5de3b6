"""Shared fixtures: offline stand-ins for the remote services."""

import os

import pytest
from realign.standins import FakeOpenAIServer, FakeSerperServer

# vLLM's CPU build: run the engine in-process (starts in seconds) with a small KV cache.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Nothing in the tests may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """Every test gets an empty request cache of its own (never the user's ~/.cache),
    outside its tmp_path so that it never shows among the test's output files."""
    path = tmp_path_factory.mktemp("request-cache")
    monkeypatch.setenv("REALIGN_CACHE_DIR", str(path))
    return path


@pytest.fixture
def fake_openai():
    """A running FakeOpenAIServer; point clients at `fake_openai.url`."""
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
def fake_serper():
    """A running FakeSerperServer; point clients at `fake_serper.search_url`."""
    with FakeSerperServer() as server:
        yield server


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama + tokenizer folder standing in for the 13B task classifier."""
    from tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_model")))
