"""`FlexGenClient`: HELM's `Request` -> FlexGen engine batches -> HELM's `RequestResult`.

Follows `helm/clients/huggingface_client.py` (HELM 0.5.x) where results must line up with it:
prompts are tokenised with the same Hugging Face tokenizer call (special tokens added, so OPT gets
its `</s>` prefix), token texts are `tokenizer.decode([id])`, texts are `tokenizer.decode(ids)`,
echoed prompts report `0.0` for the first token, and the end-of-text token ends a completion.
Differences, on purpose:
- temperature 0 is greedy decoding (HELM's client samples at temperature 1e-7), and every logprob
  is the model's own log-softmax, never a temperature-processed one;
- stop sequences act on text: any number, any length. The engine stops early on each stop's
  canonical tokenisation; the completion is then cut at the first occurrence of any stop string in
  the decoded text (a stop merged into a larger token is still found), keeping the tokens that
  start before the cut, and `finish_reason` says why it ended;
- with `echo_prompt` and `max_tokens > 0`, every token carries its real logprob (HELM's client
  reports 0.0 for each one there), and the echoed text is the whole sequence decoded at once;
- `top_k_per_token` is part of the cache key only: HELM 0.5's `Token` has no field for the
  alternatives (HELM's own client ignores it too).
Chat templates follow HELM's client: `apply_chat_template` (default: whether the tokenizer has a
template) wraps the prompt as one user message (or renders `request.messages`) with the generation
prompt added, and that text is what is tokenised, scored, echoed and cached.

The client object is cheap (HELM builds several at once). Engines are loaded lazily, once per
(checkpoint, policy, offload folder, device, dtype) per process, in `ENGINES`, each with a
`Batcher` that gathers concurrent requests into engine batches. The cache lookup comes first, so
cache hits never load a model or wait for a batch; a miss is written to HELM's cache by its own
thread as soon as its batch returns. With `request_log` set, each request the engine computes (a
cache miss) appends one JSON line to that file: which request (a digest of its cache key), its
prompt and generation lengths, and its batch (size, seconds), for watching a long run and auditing
what a rerun recomputed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import threading
import time
from typing import Any, Mapping, Sequence

import torch
from helm.clients.client import CachingClient
from helm.common.cache import CacheConfig
from helm.common.hierarchical_logger import hexception, hlog
from helm.common.request import (
    ErrorFlags,
    GeneratedOutput,
    Request,
    RequestResult,
    Token,
)
from helm.tokenizers.huggingface_tokenizer import HuggingFaceTokenizer
from helm.tokenizers.tokenizer import Tokenizer

from flexgen_core import Engine, Policy
from flexgen_core.engine import context_overflow, distinct_completions
from flexgen_core.policy import auto_compression
from flexgen_core.memory import DTYPE_BYTES
from flexgen_core.runtime.capacity import PolicyDoesNotFit
from flexgen_core.runtime.decoding import NonFiniteError
from flexgen_core.runtime.device_names import check_device_name
from flexgen_helm.batcher import BatcherClosed, BatchOutcome, BatchSettings
from flexgen_helm.engines import (  # noqa: F401 - ENGINES and PROGRESS are read by tests through this module
    ENGINES,
    PROGRESS,
    ConfigurationError,
    EngineKey,
    RequestRejected,
)
from flexgen_helm.tokenizer import unavailable_reason

DTYPES = tuple(DTYPE_BYTES)

# HELM's finish reasons (helm/benchmark/metrics/basic_metrics.py) for the engine's; a scoring-only
# call (max_new_tokens=0) has none: it stopped at its length of 0.
_FINISH_REASONS = {"length": "length", "stop": "stop", "eos": "endoftext", None: "length"}


def _failure(message: str, retriable: bool = True, fatal: bool = True) -> RequestResult:
    """A failed result. HELM retries a retriable one (5 attempts, backing off from 5 s); once it
    stops, a fatal failure ends the run entry and a non-fatal one counts as an empty completion."""
    flags = ErrorFlags(is_retriable=retriable, is_fatal=fatal)
    return RequestResult(success=False, cached=False, error=message, error_flags=flags, completions=[], embedding=[])


# OSError numbers a retry may get past: space or memory freed meanwhile, an interrupted or busy call,
# a stalled network filesystem. Others (a missing file, no permission, a read-only filesystem) repeat.
TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EAGAIN, errno.EINTR, errno.EBUSY,
                              errno.EIO, errno.ETIMEDOUT, errno.ESTALE})


def _failure_for(error: Exception) -> RequestResult:
    """The failed result for an exception from computing a request: whether HELM should retry it and
    whether it ends the run entry."""
    if isinstance(error, RequestRejected):
        return _failure(f"FlexGen: {error}", retriable=False, fatal=False)
    if isinstance(error, ConfigurationError):
        return _failure(f"FlexGen: {error}", retriable=False, fatal=True)
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):  # may pass in another batch: HELM retries
        hexception(error)
        return _failure(f"FlexGen: out of memory: {error}")
    if isinstance(error, NonFiniteError):  # corrupt weights: every later request would fail as well
        return _failure(f"FlexGen: {error}", retriable=False, fatal=True)
    if isinstance(error, PolicyDoesNotFit):  # memory or disk short now (other processes): only this batch fails
        return _failure(f"FlexGen: {error}", retriable=True, fatal=False)
    if isinstance(error, OSError):  # this batch fails; the engine serves the next ones
        return _failure(f"FlexGen: {error}", retriable=error.errno in TRANSIENT_ERRNOS, fatal=False)
    hexception(error)  # a bug, not bad luck: retrying would only repeat it
    return _failure(f"FlexGen error: {type(error).__name__}: {error}", retriable=False, fatal=True)


def _check_request(raw_request: Mapping[str, Any]) -> None:
    """Refuse a request whose decoding parameters no engine call could take, before any work: its own
    failure (non-fatal), not the run entry's nor its batch's."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    num_completions, max_tokens = raw_request["num_completions"], raw_request["max_tokens"]
    temperature, top_p = raw_request["temperature"], raw_request["top_p"]
    if not isinstance(num_completions, int) or not 1 <= num_completions <= Engine.max_sequences:
        raise RequestRejected(f"num_completions must be an integer from 1 to {Engine.max_sequences:,}, "
                              f"got {num_completions!r}")
    if not isinstance(max_tokens, int) or max_tokens < 0:
        raise RequestRejected(f"max_tokens must be an integer >= 0, got {max_tokens!r}")
    if not number(temperature) or temperature < 0:
        raise RequestRejected(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not number(top_p) or not 0 < top_p <= 1:
        raise RequestRejected(f"top_p must be in (0, 1], got {top_p!r}")


def request_digest(cache_key: Mapping[str, Any]) -> str:
    """SHA-256 of a request's cache key, serialised as HELM's request cache serialises keys."""
    return hashlib.sha256(json.dumps(cache_key, sort_keys=True).encode("utf-8")).hexdigest()


def request_seed(cache_key: Mapping[str, Any]) -> int:
    """A sampling seed from the whole request (prompt, settings, HELM's `random`): same request,
    same samples, whatever batch it lands in."""
    digest = bytes.fromhex(request_digest(cache_key))
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class RequestLog:
    """Appends one JSON line per computed request to a file shared by threads (and processes)."""

    _lock = threading.Lock()

    def __init__(self, path: str) -> None:
        self.path = path
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as error:
            raise ValueError(f"request_log {path!r}: cannot create its folder: {error}") from error
        if os.path.isdir(path):
            raise ValueError(f"request_log {path!r} is a folder, not a file")

    def append(self, entry: Mapping[str, Any]) -> None:
        line = json.dumps(entry, sort_keys=True) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)


class FlexGenClient(CachingClient):
    """HELM client for `flexgen/...` deployments (see the module docstring)."""

    def __init__(
        self,
        cache_config: CacheConfig,
        tokenizer: Tokenizer,
        tokenizer_name: str,
        pretrained_model_name_or_path: str,
        policy: Any = "auto",
        offload_dir: str | None = None,
        device: str = "auto",
        dtype: str = "float32",
        end_of_text_token: str | None = None,
        batch_wait_s: float = 0.05,
        request_log: str | None = None,
        apply_chat_template: bool | None = None,
        compress: str = "never",
    ) -> None:
        super().__init__(cache_config=cache_config)
        self._tokenizer = tokenizer
        self._tokenizer_name = tokenizer_name
        self._end_of_text_token = end_of_text_token
        self._model_path = os.path.expanduser(pretrained_model_name_or_path)
        # Bad arguments come back as a fatal, non-retriable result of the first request: HELM would
        # otherwise turn an exception here into a crash with less context.
        self._config_error: str | None = None
        self._apply_chat_template = False
        self._engine_key: EngineKey | None = None
        self._request_log: RequestLog | None = None
        try:
            if not isinstance(tokenizer, HuggingFaceTokenizer):
                raise ValueError(f"FlexGenClient needs a HuggingFaceTokenizer, got {type(tokenizer).__name__}")
            check_device_name(device)
            if dtype not in DTYPES:
                raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
            if batch_wait_s < 0:
                raise ValueError(f"batch_wait_s must be >= 0, got {batch_wait_s}")
            missing = unavailable_reason(self._model_path, "checkpoint")
            if missing is not None:
                raise ValueError(missing)
            offload = os.path.expanduser(offload_dir or os.path.join("~", ".cache", "flexgen-helm", "offload"))
            parsed = Policy.parse(policy)
            auto_compression(compress)  # a bad value is named here, before any work
            if compress != "never" and parsed != "auto":
                raise ValueError("compress goes with policy: auto (a given policy carries its own switches)")
            self._engine_key = EngineKey(
                self._model_path, parsed, offload, device, dtype, float(batch_wait_s), compress
            )
            if request_log is not None:
                self._request_log = RequestLog(os.path.expanduser(request_log))
            if apply_chat_template is not None and not isinstance(apply_chat_template, bool):
                raise ValueError(f"apply_chat_template must be true or false, got {apply_chat_template!r}")
            self._apply_chat_template = apply_chat_template
            if apply_chat_template is None:  # HELM's rule: a tokenizer with a chat template means a chat model
                with tokenizer.get_wrapped_tokenizer() as hf_tokenizer:
                    self._apply_chat_template = bool(hf_tokenizer.chat_template)
                hlog(f"FlexGen: apply_chat_template set to {self._apply_chat_template} (whether the tokenizer "
                     "has a chat template, as HELM's HuggingFaceClient decides); set it in the deployment to change it")
        except ValueError as error:
            self._config_error = f"FlexGenClient configuration for {pretrained_model_name_or_path!r}: {error}"

    # -- HELM entry point ------------------------------------------------------------------------

    def make_request(self, request: Request) -> RequestResult:
        if self._config_error is not None:
            return _failure(self._config_error, retriable=False, fatal=True)
        if request.embedding:
            return _failure("FlexGenClient does not compute embeddings", retriable=False, fatal=True)
        if request.multimodal_prompt:
            return _failure("FlexGenClient serves text prompts only (no multimodal prompts)", retriable=False, fatal=True)
        if request.messages and (request.prompt or not self._apply_chat_template):
            why = "both `prompt` and `messages` are set" if request.prompt else "apply_chat_template is off"
            return _failure(f"FlexGenClient: chat messages need a chat template, and {why}", retriable=False,
                            fatal=True)

        raw_request = self._raw_request(request)
        cache_key = CachingClient.make_cache_key(raw_request, request)
        progress = PROGRESS.get(self._engine_key, request.model_deployment)
        progress.request_seen()
        try:
            response, cached = self.cache.get(cache_key, lambda: self._compute(raw_request, cache_key))
        except Exception as error:
            progress.request_failed()
            return _failure_for(error)
        if cached:
            progress.answered_from_cache()
        elif "batch_size" not in response:  # nothing to generate or score: answered without a batch
            progress.request_computed()

        completions = [
            GeneratedOutput(
                text=completion["text"],
                logprob=sum(completion["logprobs"]),
                tokens=[Token(text=text, logprob=lp) for text, lp in zip(completion["tokens"], completion["logprobs"])],
                finish_reason={"reason": completion["finish_reason"]},
            )
            for completion in response["completions"]
        ]
        return RequestResult(
            success=True,
            cached=cached,
            request_time=response["request_time"],
            request_datetime=response.get("request_datetime"),
            completions=completions,
            embedding=[],
            batch_size=response.get("batch_size"),
            batch_request_time=response.get("batch_request_time"),
        )

    # -- helpers ---------------------------------------------------------------------------------

    def _raw_request(self, request: Request) -> dict[str, Any]:
        """The cache key: everything that decides the result, nothing about batching."""
        assert self._engine_key is not None
        policy = self._engine_key.policy
        return {
            "engine": request.model_engine,
            "model_path": self._model_path,
            "dtype": self._engine_key.dtype,
            # Compression changes results; the other policy fields only move tensors around.
            # Exact policies all compute the same model; "auto" may compress only where allowed.
            "compression": ("auto" if self._engine_key.compress == "allow" else Policy().results_key())
            if policy == "auto" else policy.results_key(),
            "prompt": self._prompt(request),
            "temperature": request.temperature,
            "num_completions": request.num_completions,
            "max_tokens": request.max_tokens,
            "top_p": request.top_p,
            "echo_prompt": request.echo_prompt,
            "top_k_per_token": request.top_k_per_token,
            "stop_sequences": list(request.stop_sequences),
        }

    def _prompt(self, request: Request) -> str:
        """The text the model sees: the prompt, or with a chat template, the rendered conversation."""
        if not self._apply_chat_template:
            return request.prompt
        messages = request.messages or [{"role": "user", "content": request.prompt}]
        with self._tokenizer.get_wrapped_tokenizer() as tokenizer:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _compute(self, raw_request: dict[str, Any], cache_key: Mapping[str, Any]) -> dict[str, Any]:
        started_s = time.time()
        _check_request(raw_request)
        wrapped = self._tokenizer.get_wrapped_tokenizer()
        with wrapped as tokenizer:
            prompt_ids: list[int] = tokenizer(raw_request["prompt"], return_token_type_ids=False)["input_ids"]
            stops = [stop for stop in raw_request["stop_sequences"] if stop]  # "" would stop at once
            stop_ids = [tuple(ids) for ids in tokenizer(stops, add_special_tokens=False)["input_ids"]] if stops else []

        num_completions = raw_request["num_completions"]
        max_tokens = raw_request["max_tokens"]
        echo = raw_request["echo_prompt"]
        if max_tokens == 0 and not echo:  # nothing to generate or score
            completions = [dict(text="", tokens=[], logprobs=[], finish_reason="length")] * num_completions
            return dict(completions=completions, request_time=time.time() - started_s, request_datetime=int(started_s))

        handle = ENGINES.get(self._engine_key)  # loads the engine on first use (policy auto: at its first batch)
        max_positions = handle.max_positions
        overflow = context_overflow(len(prompt_ids), max_tokens, max_positions)
        if overflow:
            raise RequestRejected(overflow)
        temperature = raw_request["temperature"]
        # Greedy completions are all the same: compute one, copy it.
        engine_completions = distinct_completions(num_completions, temperature, max_tokens)
        settings = BatchSettings(
            max_new_tokens=max_tokens,
            temperature=float(temperature),
            top_p=float(raw_request["top_p"]),
            num_completions=engine_completions,
            stop=tuple(stop_ids),
            echo_prompt=echo,
            # HELM 0.5's Token has no field for the top-k alternatives: `top_k_per_token` is only
            # part of the cache key, as in HELM's own HuggingFaceClient.
            top_k_logprobs=0,
        )
        seed = request_seed(cache_key) if temperature > 0 else None
        outcome = self._submit(prompt_ids, settings, seed)
        result = outcome.result

        with wrapped as tokenizer:
            completions = [
                self._completion(tokenizer, prompt_ids, result.prompt_logprobs, completion, raw_request)
                for completion in result.completions
            ]
        if len(completions) < num_completions:
            completions = completions * num_completions
        if self._request_log is not None:
            self._request_log.append(
                dict(
                    request=request_digest(cache_key),
                    prompt_tokens=len(prompt_ids),
                    max_tokens=max_tokens,
                    num_completions=engine_completions,
                    batch_size=outcome.batch_size,
                    batch_s=round(outcome.batch_time_s, 6),
                    time=round(time.time(), 3),
                    engine_stats=handle.engine.stats.as_dict(),  # cumulative, after this request's batch
                )
            )
        return dict(
            completions=completions,
            batch_size=outcome.batch_size,
            batch_request_time=outcome.batch_time_s,
            request_time=time.time() - started_s,
            request_datetime=int(started_s),
        )

    def _submit(self, prompt_ids: list[int], settings: BatchSettings, seed: int | None) -> BatchOutcome:
        try:
            return ENGINES.get(self._engine_key).batcher.submit(prompt_ids, settings, seed)
        except BatcherClosed:  # unloaded between get and submit (another policy took over): reload
            return ENGINES.get(self._engine_key).batcher.submit(prompt_ids, settings, seed)

    def _completion(
        self,
        tokenizer: Any,
        prompt_ids: list[int],
        prompt_logprobs: list[float | None] | None,
        completion: Any,
        raw_request: Mapping[str, Any],
    ) -> dict[str, Any]:
        """One engine completion as HELM text, token texts, logprobs and finish reason."""
        generated_ids = list(completion.token_ids)
        generated_logprobs = list(completion.logprobs)
        finish_reason = _FINISH_REASONS[completion.finish_reason]

        stops = list(raw_request["stop_sequences"])
        if self._end_of_text_token:
            stops.append(self._end_of_text_token)
        generated_text = tokenizer.decode(generated_ids)
        cut, cut_stop = _first_stop(generated_text, stops)
        if cut is not None:
            kept = _tokens_starting_before(tokenizer, generated_ids, cut)
            generated_ids, generated_logprobs = generated_ids[:kept], generated_logprobs[:kept]
            generated_text = generated_text[:cut]
            finish_reason = "endoftext" if cut_stop == self._end_of_text_token else "stop"

        token_ids, logprobs, text = generated_ids, generated_logprobs, generated_text
        if raw_request["echo_prompt"]:
            if prompt_logprobs is None:
                raise RuntimeError("the engine returned no prompt logprobs for an echo request")
            # HELM's convention: the first prompt token, which has no context, scores 0.0.
            echoed = [0.0 if logprob is None else logprob for logprob in prompt_logprobs]
            token_ids, logprobs = prompt_ids + generated_ids, echoed + generated_logprobs
            # Decoded whole, as HELM's client does: decoding the parts apart loses a Llama-style
            # tokenizer's leading space of the first generated word.
            text = tokenizer.decode(token_ids)
            if cut is not None:  # a stop inside the last kept token: drop that token's text past the stop
                text = text[:len(text) - (len(tokenizer.decode(generated_ids)) - len(generated_text))]
        return dict(
            text=text,
            tokens=[tokenizer.decode([token_id]) for token_id in token_ids],
            logprobs=logprobs,
            finish_reason=finish_reason,
        )


def _first_stop(text: str, stops: Sequence[str]) -> tuple[int | None, str | None]:
    """Where the earliest stop string starts in `text`, and which one; (None, None) if none occurs."""
    found = [(text.find(stop), stop) for stop in stops if stop and stop in text]
    if not found:
        return None, None
    return min(found)


def _tokens_starting_before(tokenizer: Any, token_ids: Sequence[int], cut: int) -> int:
    """How many leading tokens start before character `cut` of `decode(token_ids)`.

    A token that straddles the cut is kept (HELM can only cut at token boundaries and keeps it too);
    the ones after it go. A token's start is the length of the text decoded from the ones before it,
    which grows with the number of tokens (an incomplete UTF-8 character decodes to one replacement
    character until completed), so a binary search needs O(log n) decodes.
    """
    low, high = 0, len(token_ids)  # the answer: the fewest tokens whose decoded text reaches `cut`
    while low < high:
        mid = (low + high) // 2
        if len(tokenizer.decode(list(token_ids[:mid]))) < cut:
            low = mid + 1
        else:
            high = mid
    return low
