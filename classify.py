"""Stage 1 of ReAlign: label the first query of every record with one of the 46 tasks.

The released classifier (GAIR/ReAlign-Task-Classifier, LLaMA-2-13B) reads the
prompt PROMPT_INPUT_FOR_TASK_CLS of constant.py and answers a task name; an
answer that is not one of the 46 names becomes `default`.

Usage:
    python classify.py --input_data_path datasets/examples/realign_examples_unlabeled.jsonl \
        --output_path outputs/classified.json
    python classify.py --backend openai --base_url http://localhost:8000/v1 \
        --input_data_path data.json --output_path outputs/classified.json
    python classify.py --eval --input_data_path classifier_test.json --output_path outputs/cls_eval.json

Input: records (JSON list or JSONL, see datasets/README.md); with --eval, the
classifier data format [{"instruction", "category"}].
Output: --output_path, a JSON list of the same records with items[0].category
set (with --eval: the metrics and the predictions), written once at the end.
Progress: <output stem>_progress.jsonl next to the output, one line per
classified record, appended as each chunk finishes; a rerun skips what is there.

Environment: OPENAI_API_KEY (openai backend; a `vllm serve` without --api-key
accepts any value), OPENAI_BASE_URL (default of --base_url).
"""

import argparse
import collections
import contextlib
import json
import logging
import os
import re
import sys
import time

import constant
from realign import (
    FatalError,
    InputError,
    ProgressWriter,
    check_constants,
    exits_cleanly,
    fingerprint,
    iter_records,
    positive_float,
    positive_int,
    read_json_or_jsonl,
    read_progress_lines,
    refuse_overwriting_input,
    OutputLock,
    setup_logging,
    write_json_atomic,
    write_json_list_atomic,
)
from realign.cache import open_cache, request_key
from realign.records import batched
from realign.cli import ArgumentParser, progress_bar
from realign.client import (
    CHAT,
    COMPLETIONS,
    OpenAITransport,
    Sampling,
    add_client_arguments,
    default_reasoning_effort,
    finish_client_arguments,
    reply_text,
    resolve_api_key,
)
from realign.engine import STATUS_SECONDS, Request, Usage, options_from_args, send_requests
from realign.pool import Stopper
from realign.pricing import Spend, price_of_run

logger = logging.getLogger("classify")

DEFAULT_MODEL = "GAIR/ReAlign-Task-Classifier"
FALLBACK_TASK = "default"
# Sampling of the original: greedy, answers of at most 50 tokens.
TEMPERATURE = 0.0
TOP_P = 1.0
MAX_TOKENS = 50
CHAT_MAX_TOKENS = 256  # openai_chat: room for a JSON answer (and a little reasoning)
EXPECTED_ANSWER_TOKENS = 10  # what one answer costs, for --max_cost and the dry run
BACKENDS = ("vllm", "openai", "openai_chat", "transformers")
API_BACKENDS = ("openai", "openai_chat")
LOCAL_SERVER = "http://localhost:8000/v1"  # --backend openai: a `vllm serve` of the classifier
TRUNCATION_MARK = "\n...\n"  # stands for the middle of a query cut to fit the model
PROMPT_MARGIN = 16  # tokens kept free where the template and the query meet
MIN_QUERY_TOKENS = 64  # a --max_model_len that leaves less room for the query is a mistake
CPU_KVCACHE_GIB = 4  # vLLM's CPU build: KV cache size unless VLLM_CPU_KVCACHE_SPACE says otherwise
MAX_SHORTENINGS = 4  # openai backend: halvings of a query the server finds too long
ANSWER_SUFFIX = "Task name:\n\n"  # how the prompt ends: the answer follows it

_TASK_NAME_PREFIX_RE = re.compile(r"^\s*task\s*name\s*:", re.IGNORECASE)
_LENGTH_REJECTION_RE = re.compile(
    r"context length|too long|maximum.{0,40}tokens|input tokens|prompt.{0,40}tokens", re.IGNORECASE | re.DOTALL
)
_EDGE_CHARS = " \t`*\"'"  # quotes and markdown emphasis around an answer
_TRAILING_PUNCTUATION = ".,;:!?。"

Job = collections.namedtuple("Job", "id query fingerprint")


# -- prompts and answers --------------------------------------------------------------


def task_names():
    """The 46 task names in the order the classifier prompt lists them."""
    return list(constant.TASK_DESCRIPTION)


def build_prompt(query):
    """The classifier prompt for one query (SPEC §2), exactly as the model was trained on it."""
    return constant.PROMPT_INPUT_FOR_TASK_CLS.format(input=query)


def normalize_answer(text):
    """The task name in a free-text answer: drops a leading "Task name:", keeps the first
    non-empty line, strips quotes, emphasis and trailing punctuation, lower-cases."""
    text = _TASK_NAME_PREFIX_RE.sub("", text or "", count=1)
    line = next((line for line in text.splitlines() if line.strip()), "")
    line = line.strip(_EDGE_CHARS).rstrip(_TRAILING_PUNCTUATION + _EDGE_CHARS)
    return line.lower()


def parse_task(text, names):
    """The task a model answer names, or ``None`` when it names none of ``names``."""
    answer = normalize_answer(text)
    return answer if answer in names else None


def job_fingerprint(args, sampling, query):
    """The fingerprint of a query's progress line: everything that changes its answer (the
    backend, the model, constrained decoding and its field, the prompt as sent and the
    sampling); a line made with other settings is classified again."""
    if args.backend in API_BACKENDS:
        path, body = logical_request(args, query, sampling)
        return fingerprint("classify", args.backend, request_key(path, body))
    return fingerprint("classify", args.backend, args.model, args.constrained, build_prompt(query), TEMPERATURE,
                       TOP_P, MAX_TOKENS)


def join_ends(head, tail):
    """A shortened query: its start and its end around a mark standing for the cut middle."""
    return head.rstrip() + TRUNCATION_MARK + tail.lstrip()


def shorten_query(query, tokenizer, budget):
    """Keep about ``budget`` tokens of ``query``: the first half and the last half."""
    ids = tokenizer(query, add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) <= budget:
        return query
    head, tail = (budget + 1) // 2, budget // 2
    head_text = tokenizer.decode(ids[:head], skip_special_tokens=True)
    tail_text = tokenizer.decode(ids[len(ids) - tail:], skip_special_tokens=True) if tail else ""
    return join_ends(head_text, tail_text)


def count_prompt_tokens(tokenizer, prompt):
    """Tokens of a prompt as the engine sees it (with the special tokens it adds, e.g. BOS)."""
    return len(tokenizer(prompt, verbose=False)["input_ids"])


class PromptFitter:
    """Builds prompts that fit ``max_prompt_tokens``, shortening a too-long query (keeping
    its start and its end) so that the prompt template always survives intact."""

    def __init__(self, tokenizer, max_prompt_tokens):
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        template_tokens = count_prompt_tokens(tokenizer, build_prompt(""))
        self.query_budget = max_prompt_tokens - template_tokens - PROMPT_MARGIN
        if self.query_budget < MIN_QUERY_TOKENS:
            raise FatalError(
                f"a model length of {max_prompt_tokens + MAX_TOKENS} tokens leaves {self.query_budget} tokens "
                f"for the query (the classifier prompt alone takes {template_tokens}); raise --max_model_len"
            )

    def __call__(self, query):
        """``(prompt, shortened)`` for one query."""
        # A token covers at least one UTF-8 byte, so a short query needs no tokenizing.
        if len(query.encode("utf-8")) <= self.query_budget:
            return build_prompt(query), False
        budget = self.query_budget
        for _ in range(MAX_SHORTENINGS):
            text = shorten_query(query, self.tokenizer, budget)
            prompt = build_prompt(text)
            over = count_prompt_tokens(self.tokenizer, prompt) - self.max_prompt_tokens
            if over <= 0:
                return prompt, text != query
            budget = max(budget - over - PROMPT_MARGIN, 1)
        # Decoding and re-encoding kept growing the text: cut by characters, safely short.
        chars = budget // 2
        return build_prompt(join_ends(query[:chars], query[-chars:])), True


def halve_query(query):
    """Half of a query's characters, its start and its end (the openai backend has no tokenizer)."""
    keep = len(query) // 4
    return join_ends(query[:keep], query[len(query) - keep:])


def is_length_rejection(error):
    """Whether a refused request was refused for being too long."""
    return error.refused and error.status in (400, 413) and _LENGTH_REJECTION_RE.search(str(error)) is not None


def build_choice_trie(tokenizer, names, eos_token_id):
    """Token-id trie of the task names for constrained decoding with transformers.

    Each name is entered twice: tokenized alone and tokenized after the prompt's
    last words (SentencePiece tokenizers spell a word differently in context).
    A complete name leads to ``eos_token_id``.
    """
    trie = {}
    context = tokenizer(ANSWER_SUFFIX, add_special_tokens=False)["input_ids"]
    for name in names:
        variants = [tokenizer(name, add_special_tokens=False)["input_ids"]]
        in_context = tokenizer(ANSWER_SUFFIX + name, add_special_tokens=False)["input_ids"]
        if in_context[: len(context)] == context:
            variants.append(in_context[len(context):])
        for ids in variants:
            node = trie
            for token in ids:
                node = node.setdefault(token, {})
            node.setdefault(eos_token_id, {})
    return trie


def allowed_next_tokens(trie, generated, eos_token_id):
    """Tokens that keep ``generated`` on the way to a task name (only EOS once off it or done)."""
    node = trie
    for token in generated:
        node = node.get(token)
        if node is None:
            return [eos_token_id]
    return list(node) or [eos_token_id]


def make_prefix_fn(trie, prompt_len, eos_token_id):
    """transformers' ``prefix_allowed_tokens_fn`` for a batch whose prompts are ``prompt_len`` long."""
    if trie is None:
        return None
    return lambda _, ids: allowed_next_tokens(trie, ids[prompt_len:].tolist(), eos_token_id)


def constrained_extra_body(names, field):
    """The request fields that make a `vllm serve` endpoint answer one of ``names``."""
    if field == "guided_choice":  # vLLM servers from before structured outputs (removed in v0.12)
        return {"guided_choice": names}
    return {"structured_outputs": {"choice": names}}


# -- records --------------------------------------------------------------------------


def progress_path_for(output_path):
    """``out/classified.json`` -> ``out/classified_progress.jsonl``."""
    return os.path.splitext(output_path)[0] + "_progress.jsonl"


def needs_label(record, names, overwrite):
    """A record is classified unless it already carries a valid category (and no --overwrite)."""
    return overwrite or record["items"][0].get("category") not in names


def load_eval_items(path):
    """Validated classifier data ``[{"instruction": str, "category": str}, ...]``."""
    items = read_json_or_jsonl(path)
    if not isinstance(items, list):
        raise InputError(f"{path}: expected a JSON list of {{'instruction', 'category'}} items")
    if not items:
        raise InputError(f"{path}: no items to evaluate on")
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise InputError(f"{path}: item {index}: expected an object")
        for field in ("instruction", "category"):
            if not isinstance(item.get(field), str):
                what = "is missing" if field not in item else "must be a string"
                raise InputError(f"{path}: item {index}: field '{field}' {what}")
    return items


def load_done(progress_path, jobs):
    """Progress entries of ``jobs`` (by id) whose fingerprint still matches the job."""
    lines, stale = read_progress_lines(progress_path, {job.id: job.fingerprint for job in jobs})
    if stale:
        logger.warning("%s: %d entries were made with other settings (query, backend, model, constrained decoding "
                       "or prompt); classifying them again", progress_path, stale)
    return {record_id: entry for record_id, entry in lines.items() if "category" in entry}


def progress_entry(job, answer, names, error=None):
    """One progress line: the label, the raw answer, and the error when there was no answer."""
    task = parse_task(answer, names) if answer is not None else None
    entry = {"id": job.id, "fingerprint": job.fingerprint, "category": task or FALLBACK_TASK, "answer": answer}
    if error is not None:
        entry["error"] = error
    return entry


def fell_back(entry, names):
    """Whether a progress entry's answer named no task (and so became `default`)."""
    return entry.get("answer") is not None and parse_task(entry["answer"], names) is None


# -- evaluation -----------------------------------------------------------------------


def classification_metrics(gold, predicted):
    """Accuracy, per-task precision/recall/F1/support, macro F1 and confusion counts.

    Macro F1 averages the F1 of every label that occurs among the gold labels or the
    predictions (as scikit-learn does); a label never predicted has precision 0, one
    never in the gold set has recall 0, and F1 is 0 when both are 0.
    """
    if len(gold) != len(predicted) or not gold:
        raise ValueError("gold and predicted must be non-empty lists of the same length")
    correct = collections.Counter(g for g, p in zip(gold, predicted) if g == p)
    support = collections.Counter(gold)
    predicted_counts = collections.Counter(predicted)
    per_task = {}
    for label in sorted(set(gold) | set(predicted)):
        precision = correct[label] / predicted_counts[label] if predicted_counts[label] else 0.0
        recall = correct[label] / support[label] if support[label] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_task[label] = {"precision": precision, "recall": recall, "f1": f1,
                           "support": support[label], "predicted": predicted_counts[label]}
    confusions = collections.Counter((g, p) for g, p in zip(gold, predicted) if g != p)
    return {
        "count": len(gold),
        "accuracy": sum(correct.values()) / len(gold),
        "macro_f1": sum(m["f1"] for m in per_task.values()) / len(per_task),
        "per_task": per_task,
        "confusions": [{"gold": g, "predicted": p, "count": n} for (g, p), n in confusions.most_common()],
    }


def format_metrics(metrics, names, top_confusions=10):
    """Log lines: the headline, a per-task table (in prompt order) and the top confusions."""
    lines = [f"accuracy: {metrics['accuracy']:.4f}  macro_f1: {metrics['macro_f1']:.4f}"]
    order = {name: i for i, name in enumerate(names)}
    width = max(len(label) for label in metrics["per_task"])
    lines.append(f"{'task':<{width}}  precision  recall      f1  support")
    for label in sorted(metrics["per_task"], key=lambda t: (order.get(t, len(order)), t)):
        m = metrics["per_task"][label]
        lines.append(f"{label:<{width}}  {m['precision']:9.4f}  {m['recall']:6.4f}  {m['f1']:6.4f}  {m['support']:7d}")
    if metrics["confusions"]:
        lines.append("most frequent confusions (gold -> predicted: count):")
        for c in metrics["confusions"][:top_confusions]:
            lines.append(f"  {c['gold']} -> {c['predicted']}: {c['count']}")
    return lines


# -- backends -------------------------------------------------------------------------
# Each backend calls ``save_results(results)`` with (job, answer, error) triples as
# answers come in; it appends them to the progress file at once.


def build_prompts(jobs, fit, stats):
    """The prompts of ``jobs``, shortened by ``fit`` (a PromptFitter) where it is given."""
    prompts = []
    for job in jobs:
        prompt, shortened = fit(job.query) if fit else (build_prompt(job.query), False)
        stats["shortened"] += shortened
        prompts.append(prompt)
    return prompts


def visible_gpu_count():
    import torch

    return torch.cuda.device_count()


def start_vllm_engine(args):
    """The vLLM engine for ``args`` (a function of its own so tests can reuse one engine)."""
    try:
        from vllm import LLM
    except ImportError:
        raise FatalError("vLLM is not installed: pip install vllm, or use --backend transformers or openai") from None
    gpus = visible_gpu_count()
    if not gpus and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        # Otherwise the CPU build reserves 92% of the memory and fails when other processes hold some.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(CPU_KVCACHE_GIB)
        logger.info("no GPU visible: vLLM runs on CPU with a %d GiB KV cache (set VLLM_CPU_KVCACHE_SPACE to change)",
                    CPU_KVCACHE_GIB)
    kwargs = {
        "model": args.model,
        "tensor_parallel_size": args.tensor_parallel_size or max(1, gpus),
        "dtype": args.dtype,
        "enforce_eager": args.enforce_eager,
        "enable_prefix_caching": True,  # every prompt shares the 46-name prefix
    }
    if args.max_model_len:
        kwargs["max_model_len"] = args.max_model_len
    if args.gpu_memory_utilization:
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    logger.info("starting vLLM: %s", ", ".join(f"{k}={v}" for k, v in kwargs.items()))
    return LLM(**kwargs)


def vllm_sampling_params(names, constrained):
    from vllm import SamplingParams

    kwargs = {"temperature": TEMPERATURE, "top_p": TOP_P, "max_tokens": MAX_TOKENS}
    if constrained:
        try:
            from vllm.sampling_params import StructuredOutputsParams

            kwargs["structured_outputs"] = StructuredOutputsParams(choice=names)
        except ImportError:  # vLLM before structured outputs: the guided-decoding API
            try:
                from vllm.sampling_params import GuidedDecodingParams
            except ImportError:
                raise FatalError("this vLLM has no structured outputs or guided decoding; "
                                 "rerun with --no-constrained") from None
            kwargs["guided_decoding"] = GuidedDecodingParams(choice=names)
    return SamplingParams(**kwargs)


def engine_max_model_len(llm, fallback):
    try:
        return llm.llm_engine.model_config.max_model_len
    except AttributeError:
        return fallback


def classify_with_vllm(args, jobs, names, save_results, stats, stopper):
    """One ``generate`` call per chunk of ``--chunk_size`` prompts; a stop signal ends the
    run after the chunk in progress is saved."""
    llm = start_vllm_engine(args)
    params = vllm_sampling_params(names, args.constrained)
    max_model_len = engine_max_model_len(llm, args.max_model_len)
    fit = PromptFitter(llm.get_tokenizer(), max_model_len - MAX_TOKENS) if max_model_len else None
    for chunk in batched(jobs, args.chunk_size):
        if stopper.is_set():
            return
        outputs = llm.generate(build_prompts(chunk, fit, stats), params, use_tqdm=False)
        save_results([(job, output.outputs[0].text, None) for job, output in zip(chunk, outputs)])


def classify_with_transformers(args, jobs, names, save_results, stats, stopper):
    """Batched greedy generation with a Hugging Face model (no vLLM needed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    import transformers

    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    # transformers 4.56 renamed torch_dtype to dtype.
    version = tuple(int(part) for part in transformers.__version__.split(".")[:2])
    dtype_kwarg = "dtype" if version >= (4, 56) else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(args.model, **{dtype_kwarg: dtype}).to(device).eval()
    max_model_len = args.max_model_len or getattr(model.config, "max_position_embeddings", None)
    fit = PromptFitter(tokenizer, max_model_len - MAX_TOKENS) if max_model_len else None
    eos = tokenizer.eos_token_id
    trie = build_choice_trie(tokenizer, names, eos) if args.constrained else None

    logger.info("transformers: %s on %s, batches of %d", args.model, device, args.batch_size)
    for chunk in batched(jobs, args.chunk_size):
        if stopper.is_set():
            return
        prompts = build_prompts(chunk, fit, stats)
        answers = [None] * len(chunk)
        # Similar lengths together: less padding.
        order = sorted(range(len(chunk)), key=lambda i: len(prompts[i]), reverse=True)
        for batch in batched(order, args.batch_size):
            encoded = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True).to(device)
            prompt_len = encoded["input_ids"].shape[1]
            with torch.no_grad():
                out = model.generate(**encoded, do_sample=False, max_new_tokens=MAX_TOKENS,
                                     pad_token_id=tokenizer.pad_token_id,
                                     prefix_allowed_tokens_fn=make_prefix_fn(trie, prompt_len, eos))
            texts = tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
            for i, text in zip(batch, texts):
                answers[i] = text
        save_results([(job, answer, None) for job, answer in zip(chunk, answers)])


def build_chat_messages(query):
    """The chat messages of ``--backend openai_chat`` (constant.CHAT_CLASSIFIER_PROMPTS)."""
    tasks = "\n".join(f"- {name}: {description}" for name, description in constant.TASK_DESCRIPTION.items())
    prompts = constant.CHAT_CLASSIFIER_PROMPTS
    return [{"role": "system", "content": prompts["system"].format(tasks=tasks).strip()},
            {"role": "user", "content": prompts["user"].format(input=query).strip()}]


def task_schema(names):
    """OpenAI structured outputs: a JSON object whose ``task`` is one of ``names``."""
    return {"type": "json_schema",
            "json_schema": {"name": "task_choice", "strict": True,
                            "schema": {"type": "object", "properties": {"task": {"type": "string", "enum": names}},
                                       "required": ["task"], "additionalProperties": False}}}


def chat_answer(text):
    """The task a chat reply names: the ``task`` of a JSON answer, else the text itself."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return text
    if isinstance(value, dict) and isinstance(value.get("task"), str):
        return value["task"]
    return text


def api_sampling(args, names):
    """The request settings of the API backends."""
    if args.backend == "openai_chat":
        effort, is_default = default_reasoning_effort(args.model, args.reasoning_effort)
        return Sampling(model=args.model, n=1, temperature=TEMPERATURE, top_p=TOP_P,
                        max_output_tokens=CHAT_MAX_TOKENS, reasoning_effort=effort,
                        service_tier=args.service_tier, extra_body=dict(args.extra_body or {}),
                        response_format=task_schema(names) if args.constrained else None,
                        effort_is_default=is_default)
    extra = constrained_extra_body(names, args.constrained_field) if args.constrained else {}
    return Sampling(model=args.model, n=1, temperature=TEMPERATURE, top_p=TOP_P, max_output_tokens=MAX_TOKENS,
                    reasoning_effort=args.reasoning_effort, service_tier=args.service_tier,
                    extra_body={**extra, **(args.extra_body or {})})


def logical_request(args, query, sampling):
    """``(path, logical body)`` of one query's request."""
    if args.backend == "openai_chat":
        return CHAT, {"messages": build_chat_messages(query), **sampling.fields()}
    return COMPLETIONS, {"prompt": build_prompt(query), **sampling.fields()}


def api_requests(args, jobs, sampling, save_results, stats):
    """One request per query; a query the server finds too long is halved and asked again."""
    def request(job, query, shortenings=0):
        def on_reply(reply):
            text = reply_text(reply)
            if text is None:  # no text: not used, and not cached
                stats["unfinished"] += 1
                return False
            save_results([(job, chat_answer(text) if args.backend == "openai_chat" else text, None)])
            return True

        def on_error(error):
            if is_length_rejection(error) and shortenings < MAX_SHORTENINGS:
                stats["shortened"] += shortenings == 0
                return request(job, halve_query(query), shortenings + 1)
            if error.refused:
                logger.warning("record %r: the server refused it (%s); labelled %s", job.id, error, FALLBACK_TASK)
                save_results([(job, None, str(error))])
            else:
                logger.warning("record %r: %s; rerun to retry it", job.id, error)
                stats["unfinished"] += 1
            return None

        _, body = logical_request(args, query, sampling)
        return Request(body, on_reply, on_error, expected_output=EXPECTED_ANSWER_TOKENS)

    return (request(job, job.query) for job in jobs)


def api_transport(args, api_key, sampling):
    path = CHAT if args.backend == "openai_chat" else COMPLETIONS
    return OpenAITransport(args.base_url, api_key, path=path, model=args.model, timeout=args.request_timeout,
                           check_model=args.model_check, effort_is_default=sampling.effort_is_default)


def classify_with_api(args, jobs, names, save_results, stats, api_key, price, progress=None):
    """``--concurrency`` requests at once through the engine; its Usage."""
    cache = open_cache(args)
    sampling = api_sampling(args, names)
    transport = api_transport(args, api_key, sampling)
    options = options_from_args(args, cache=cache, price=price, limits_key=transport.limits_key,
                                completion_note=f"about {EXPECTED_ANSWER_TOKENS} tokens an answer",
                                refusal_hint="check --model, --base_url, --constrained and --extra_body",
                                progress=progress)
    try:
        return send_requests(api_requests(args, jobs, sampling, save_results, stats), transport, options, "classify")
    finally:
        if cache is not None:
            cache.close()


def dry_run_api(args, jobs, names, price):
    """``--dry_run`` of the API backends: what the run would send and cost."""
    usage = classify_with_api(args, jobs, names, lambda results: None, collections.Counter(), None, price)
    for line in usage.dry.lines(extra=f"{len(jobs)} queries to classify with {args.model}"):
        print(line)
    usage.write(args.usage_path)
    return 0


# -- command line ---------------------------------------------------------------------


def parse_args(argv=None):
    parser = ArgumentParser(
        description="Label each record's first query with one of the 46 ReAlign tasks (stage 1).")
    parser.add_argument("--input_data_path", required=True,
                        help="records to classify (JSON list or JSONL); with --eval, [{instruction, category}]")
    parser.add_argument("--output_path", required=True,
                        help="where to write the classified records (JSON); progress goes to "
                             "<output stem>_progress.jsonl next to it")
    parser.add_argument("--backend", choices=BACKENDS, default="vllm",
                        help="vllm: local engine (GPU); openai: an OpenAI-compatible completions endpoint "
                             "serving the classifier, e.g. `vllm serve`; openai_chat: any chat model (no GPU: "
                             "e.g. the default OpenAI model) with a prompt built from TASK_DESCRIPTION; "
                             "transformers: no vLLM needed (CPU or one small GPU)")
    parser.add_argument("--model", default=None,
                        help=f"classifier: a Hugging Face hub name or a local folder; for --backend openai, the "
                             f"served model name (default: {DEFAULT_MODEL}); for openai_chat, the chat model "
                             f"(default: {constant.DEFAULT_MODEL})")
    parser.add_argument("--constrained", action=argparse.BooleanOptionalAction, default=None,
                        help="force every answer to be one of the 46 names (vLLM structured outputs; a JSON "
                             "schema with openai_chat; default: on, except for --backend openai)")
    parser.add_argument("--constrained_field", choices=("structured_outputs", "guided_choice"),
                        default="structured_outputs",
                        help="openai backend: the request field that carries the choices; guided_choice for "
                             "vLLM servers older than the structured_outputs API (default: %(default)s)")
    parser.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                        help="classify records that already carry a valid category too (default: keep theirs)")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="skip records already in the progress file (--no-resume starts over; default: on)")
    parser.add_argument("--eval", action=argparse.BooleanOptionalAction, default=False,
                        help="evaluate the classifier on [{instruction, category}] data: accuracy, macro F1, "
                             "per-task table; writes predictions and metrics to --output_path (default: off)")
    parser.add_argument("--chunk_size", type=positive_int, default=4096,
                        help="prompts per engine call and per progress flush (vllm, transformers; "
                             "default: %(default)s)")
    vllm = parser.add_argument_group("vllm and transformers backends")
    vllm.add_argument("--tensor_parallel_size", type=positive_int, default=None,
                      help="GPUs per model (default: the number of visible GPUs, at least 1)")
    vllm.add_argument("--max_model_len", type=positive_int, default=None,
                      help="context length in tokens (default: the model's); longer queries are shortened")
    vllm.add_argument("--gpu_memory_utilization", type=float, default=None,
                      help="fraction of GPU memory vLLM may use (default: vLLM's, 0.9)")
    vllm.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"),
                      help="weight dtype (default: %(default)s; float32 on CPU)")
    vllm.add_argument("--enforce_eager", action=argparse.BooleanOptionalAction, default=False,
                      help="vllm: no CUDA graphs (faster start, needed on CPU; default: off)")
    vllm.add_argument("--batch_size", type=positive_int, default=16,
                      help="transformers: prompts per forward pass (default: %(default)s)")
    group = add_client_arguments(parser, default_concurrency=32, default_max_retries=5, default_timeout=60.0,
                                 base_url_default="$OPENAI_BASE_URL, else OpenAI for openai_chat and "
                                                  f"{LOCAL_SERVER} for openai",
                                 usage_help="API backends: also write the requests, tokens and spend (with "
                                            "--dry_run: the estimate) as JSON to this file (default: not written)")
    group.add_argument("--timeout", dest="request_timeout", type=positive_float, help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action=argparse.BooleanOptionalAction, default=False,
                        help="log debug messages (default: off)")
    args = parser.parse_args(argv)
    if args.model is None:
        args.model = constant.DEFAULT_MODEL if args.backend == "openai_chat" else DEFAULT_MODEL
    if args.constrained is None:
        args.constrained = args.backend != "openai"
    api = args.backend in API_BACKENDS
    if not api and (args.dry_run or args.max_cost is not None):
        parser.error("--dry_run and --max_cost apply to the API backends (--backend openai or openai_chat)")
    finish_client_arguments(parser, args, default_timeout=60.0)
    if args.backend == "openai" and args.base_url is None:
        args.base_url = LOCAL_SERVER
    return args


def api_key_for(args):
    """openai_chat follows the key rules of every paid stage; the openai backend talks to a
    `vllm serve` of the classifier, which needs no key unless it was started with one."""
    if args.backend == "openai_chat":
        return resolve_api_key(None, args.base_url)
    key = os.environ.get("OPENAI_API_KEY", "").strip()
    if not key:
        logger.info("OPENAI_API_KEY is not set: sending a placeholder key (enough for a vllm serve without "
                    "--api-key)")
    return key or None


def interrupt_main():
    """Second stop signal while a local engine runs: interrupt it (finished chunks are saved)."""
    raise KeyboardInterrupt


def run_local_backend(args, jobs, names, save_results, stats):
    """The vllm or transformers backend, in this process: a stop signal ends the run after the
    chunk in progress is saved; a second one interrupts the model at once."""
    stopper = Stopper()
    with stopper.signals_handled():
        stopper.on_hard_stop(interrupt_main)
        backend = classify_with_vllm if args.backend == "vllm" else classify_with_transformers
        backend(args, jobs, names, save_results, stats, stopper)
    if stopper.interrupted:
        raise KeyboardInterrupt


@exits_cleanly
def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    check_constants()
    names = task_names()
    if os.path.isdir(args.output_path):
        raise InputError(f"{args.output_path}: --output_path is a folder, expected a file path")
    refuse_overwriting_input(args.input_data_path, args.output_path)

    price = price_of_run(args, args.model) if args.backend in API_BACKENDS else None
    sampling = api_sampling(args, names) if args.backend in API_BACKENDS else None
    if args.eval:
        items = load_eval_items(args.input_data_path)
        total = len(items)
        jobs = [Job(i, item["instruction"], job_fingerprint(args, sampling, item["instruction"]))
                for i, item in enumerate(items)]
        unknown = {item["category"] for item in items} - set(names)
        if unknown:
            logger.warning("gold categories outside the 46 tasks: %s", ", ".join(sorted(unknown)))
    else:
        # Streamed twice (here and when writing) so a file of millions of records is never held whole.
        jobs, total = [], 0
        for rec in iter_records(args.input_data_path):
            total += 1
            if needs_label(rec, names, args.overwrite):
                query = rec["items"][0]["value"]
                jobs.append(Job(rec["id"], query, job_fingerprint(args, sampling, query)))

    progress_path = progress_path_for(args.output_path)
    if args.dry_run:
        done = load_done(progress_path, jobs) if args.resume else {}
        return dry_run_api(args, [job for job in jobs if job.id not in done], names, price)
    if args.backend in API_BACKENDS and args.cache:  # an unusable cache stops before anything is written
        open_cache(args).close()
    api_key = api_key_for(args) if args.backend in API_BACKENDS else None
    with OutputLock(progress_path):
        return classify_and_write(args, names, jobs, total, items if args.eval else None, progress_path, price,
                                  api_key)


def classify_and_write(args, names, jobs, total, items, progress_path, price, api_key):
    if not args.resume and os.path.exists(progress_path):
        os.remove(progress_path)
    done = load_done(progress_path, jobs)
    todo = [job for job in jobs if job.id not in done]
    logger.info("#in: %d, to classify: %d (%d already in %s), kept: %d (valid category, no --overwrite)",
                total, len(todo), len(done), progress_path, total - len(jobs))

    stats = collections.Counter()
    if todo:
        with ProgressWriter(progress_path) as writer, contextlib.ExitStack() as stack:
            bars = []  # opened with the first answers, so that the model's loading logs do not tear it

            # The local backends' usage file says what is done (the engine writes the API backends').
            local = Usage("classify", None, Spend()) if args.backend not in API_BACKENDS else None
            written = [0.0]

            def save_results(results):
                if not bars:
                    bars.append(stack.enter_context(
                        progress_bar(total=len(jobs), initial=len(done), unit="rec", desc="classify")))
                for job, answer, error in results:
                    entry = progress_entry(job, answer, names, error)
                    writer.write(entry)
                    done[job.id] = entry
                bars[0].update(len(results))
                if local is not None and time.monotonic() - written[0] >= STATUS_SECONDS:
                    local.write(args.usage_path, running=True, done=len(done), total=len(jobs))
                    written[0] = time.monotonic()

            started = time.perf_counter()
            if args.backend in API_BACKENDS:
                usage = classify_with_api(args, todo, names, save_results, stats, api_key, price,
                                          progress=lambda: (len(done), len(jobs)))
                logger.info("openai: %s", usage.describe())
                usage.write(args.usage_path)
                usage.finish(progress_path)
            else:
                run_local_backend(args, todo, names, save_results, stats)
                local.write(args.usage_path, done=len(done), total=len(jobs))
            elapsed = time.perf_counter() - started
        classified = sum(1 for job in todo if job.id in done)
        logger.info("classified %d records in %.1f s (%.1f records/s, model loading included)",
                    classified, elapsed, classified / max(elapsed, 1e-9))
    if stats["unfinished"]:
        raise FatalError(f"{stats['unfinished']} records got no answer after retries; their progress is saved "
                         f"in {progress_path}: rerun the same command to classify the rest")

    entries = [done[job.id] for job in jobs]
    fallbacks = sum(fell_back(entry, names) for entry in entries)
    failed = sum("error" in entry for entry in entries)
    if items is not None:
        predicted = [entry["category"] for entry in entries]
        metrics = classification_metrics([item["category"] for item in items], predicted)
        for line in format_metrics(metrics, names):
            logger.info("%s", line)
        predictions = [{"instruction": item["instruction"], "category": item["category"],
                        "prediction": entry["category"], "answer": entry["answer"]}
                       for item, entry in zip(items, entries)]
        write_json_atomic(args.output_path, {**metrics, "model": args.model, "predictions": predictions})
        categories = collections.Counter(predicted)
    else:
        categories = collections.Counter()

        def labelled_records():
            for rec in iter_records(args.input_data_path):
                entry = done.get(rec["id"])
                if entry is not None:
                    rec["items"][0]["category"] = entry["category"]
                categories[rec["items"][0]["category"]] += 1
                yield rec

        write_json_list_atomic(args.output_path, labelled_records())
    logger.info("#in: %d, #classified: %d, #kept: %d, #fell back to %s: %d, #shortened: %d, #refused: %d; "
                "wrote %s", total, len(jobs), total - len(jobs), FALLBACK_TASK, fallbacks, stats["shortened"],
                failed, args.output_path)
    logger.info("categories: %s", ", ".join(f"{task}={n}" for task, n in categories.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
