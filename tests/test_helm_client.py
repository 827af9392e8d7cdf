"""FlexGenClient in process, built by HELM's own AutoClient from a prod_env/ folder, on the `tiny`
random-weight OPT with a real engine (weights partly on disk).

Covers what HELM sends beyond the parity runs: num_completions > 1, sampling reproducibility (also
across batch compositions), multi-token and multiple stop sequences (checked against HELM's
HuggingFaceClient), a mixture of request settings arriving concurrently, HELM's cache (hits never
wait for a batch; each batch's results are written as soon as it finishes), tokenisation parity,
and failures that must not be retried.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helm.benchmark.config_registry import (
    register_builtin_configs_from_helm_package,
    register_configs_from_directory,
)
from helm.clients.auto_client import AutoClient
from helm.common.cache_backend_config import (
    BlackHoleCacheBackendConfig,
    SqliteCacheBackendConfig,
)
from helm.common.request import Request
from helm_support import (
    FLEXGEN_DEPLOYMENT,
    HF_DEPLOYMENT,
    OFFLOAD_POLICY,
    TEST_MODEL,
    write_prod_env,
)
from reference import reference_logprobs
from transformers import AutoModelForCausalLM, AutoTokenizer

from flexgen_core.testing import PRESETS, build_checkpoint
from flexgen_helm import client as client_module
from flexgen_helm.client import FlexGenClient

LOGPROB_TOLERANCE = 2e-4
SLOW_DEPLOYMENT = "local-flexgen-slow/tiny"  # waits 2 s for a batch to fill
SMALL_DEPLOYMENT = "local-flexgen-small/tiny"  # blocks of 2 sequences
# Blocks of 8 sequences, waits 0.3 s for a batch to fill (robust on a busy host).
PATIENT_DEPLOYMENT = "local-flexgen-patient/tiny"
BAD_POLICY_DEPLOYMENT = "local-flexgen-bad-policy/tiny"
BAD_LOG_DEPLOYMENT = "local-flexgen-bad-log/tiny"
BAD_COMPRESS_DEPLOYMENT = "local-flexgen-bad-compress/tiny"  # compress: allow beside a fixed policy
MISSING_MODEL_DEPLOYMENT = "local-flexgen-missing/tiny"
AUTO_DEPLOYMENT = "local-flexgen-auto/tiny"  # policy: auto, planned at the first batch
REPLAN_DEPLOYMENT = "local-flexgen-replan/tiny"  # policy: auto, an engine of its own for the re-planning test
FAULT_DEPLOYMENT = "local-flexgen-faults/tiny"  # an engine of its own, for injected faults

PROMPTS = [
    "def parse(self, text):\n    return",
    "The river and the stone were",
    "import os\nimport sys\n\n",
    "class Garden:\n    def __init__(self):",
    "for index, value in enumerate(",
    "Paper, window: yellow light",
]


def _flexgen_deployment(name: str, checkpoint: Path, offload_dir: Path, **args) -> dict:
    client_args = {
        "pretrained_model_name_or_path": str(checkpoint),
        "policy": dict(OFFLOAD_POLICY),
        "offload_dir": str(offload_dir),
        "device": "cpu",
        "dtype": "float32",
        **args,
    }
    return {
        "name": name,
        "model_name": TEST_MODEL,
        "tokenizer_name": TEST_MODEL,
        "max_sequence_length": PRESETS["tiny"].max_positions - 1,  # see write_prod_env
        "client_spec": {"class_name": "flexgen_helm.client.FlexGenClient", "args": client_args},
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("helm_client")
    checkpoint = build_checkpoint("tiny", seed=0)
    offload = root / "offload"
    extra = [
        _flexgen_deployment(SLOW_DEPLOYMENT, checkpoint, offload, batch_wait_s=2.0),
        _flexgen_deployment(
            PATIENT_DEPLOYMENT, checkpoint, offload, policy={**OFFLOAD_POLICY, "gpu_batch_size": 4}, batch_wait_s=0.3
        ),
        _flexgen_deployment(
            SMALL_DEPLOYMENT,
            checkpoint,
            offload,
            policy={**OFFLOAD_POLICY, "gpu_batch_size": 1, "num_gpu_batches": 2},
            batch_wait_s=1.0,
        ),
        _flexgen_deployment(BAD_POLICY_DEPLOYMENT, checkpoint, offload, policy={"gpu_batch_size": 2, "w_gpu_pct": 50}),
        _flexgen_deployment(MISSING_MODEL_DEPLOYMENT, root / "no-such-checkpoint", offload),
        _flexgen_deployment(BAD_LOG_DEPLOYMENT, checkpoint, offload, request_log=str(root / "a-folder")),
        _flexgen_deployment(BAD_COMPRESS_DEPLOYMENT, checkpoint, offload, compress="allow"),
        _flexgen_deployment(AUTO_DEPLOYMENT, checkpoint, offload, policy="auto", batch_wait_s=0.5),
        _flexgen_deployment(REPLAN_DEPLOYMENT, checkpoint, offload, policy="auto", batch_wait_s=0.4),
        _flexgen_deployment(FAULT_DEPLOYMENT, checkpoint, offload, batch_wait_s=0.02),
    ]
    (root / "a-folder").mkdir()
    prod_env = write_prod_env(root / "prod_env", checkpoint, PRESETS["tiny"].max_positions, extra_deployments=extra)
    old_offline = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    register_builtin_configs_from_helm_package()
    register_configs_from_directory(str(prod_env))
    yield {"root": root, "checkpoint": checkpoint}
    client_module.ENGINES.close_all()
    if old_offline is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = old_offline


def _client(env, deployment: str, cache: str | None = None):
    """A client as HELM builds it; `cache` names a sqlite cache folder, None: no cache."""
    backend = SqliteCacheBackendConfig(str(env["root"] / cache)) if cache else BlackHoleCacheBackendConfig()
    if cache:
        (env["root"] / cache).mkdir(exist_ok=True)
    return AutoClient({}, str(env["root"] / "files"), backend)._get_client(deployment)


def _request(deployment: str = FLEXGEN_DEPLOYMENT, **fields) -> Request:
    values = dict(model_deployment=deployment, model=TEST_MODEL, prompt=PROMPTS[0], temperature=0.0, max_tokens=8)
    values.update(fields)
    return Request(**values)


def _ok(result):
    assert result.success, result.error
    return result


def _summary(result):
    """Everything a result says about its completions, but the logprobs."""
    return [(c.text, [t.text for t in c.tokens], c.finish_reason["reason"]) for c in result.completions]


def _assert_same(result, expected):
    """Same texts, tokens and finish reasons; logprobs equal to float tolerance (a batch of other
    shapes may round differently)."""
    assert _summary(result) == _summary(expected)
    for completion, expected_completion in zip(result.completions, expected.completions):
        assert [t.logprob for t in completion.tokens] == pytest.approx(
            [t.logprob for t in expected_completion.tokens], abs=LOGPROB_TOLERANCE
        )


# -- tokenisation and scoring -------------------------------------------------------------------


def test_echo_scoring_tokens_match_hf_client(env):
    """Same prompt token ids and token texts as HELM's HuggingFaceClient, same logprobs (2e-4)."""
    flexgen, hf = _client(env, FLEXGEN_DEPLOYMENT), _client(env, HF_DEPLOYMENT)
    prompts = PROMPTS[:3] + ["  leading spaces\tand tabs\n\n", "Unicode: café, naïve, 東京, emoji 🎉 done"]
    for prompt in prompts:
        fields = dict(prompt=prompt, max_tokens=0, echo_prompt=True)
        ours = _ok(flexgen.make_request(_request(**fields)))
        theirs = _ok(hf.make_request(_request(HF_DEPLOYMENT, **fields)))
        (ours_completion,), (their_completion,) = ours.completions, theirs.completions
        assert ours_completion.text == their_completion.text
        assert [t.text for t in ours_completion.tokens] == [t.text for t in their_completion.tokens]
        assert ours_completion.tokens[0].logprob == 0.0
        for ours_token, their_token in zip(ours_completion.tokens, their_completion.tokens):
            assert ours_token.logprob == pytest.approx(their_token.logprob, abs=LOGPROB_TOLERANCE)
        assert ours.batch_size >= 1 and ours.batch_request_time > 0


def test_max_tokens_zero_without_echo_is_empty(env):
    result = _ok(_client(env, FLEXGEN_DEPLOYMENT).make_request(_request(max_tokens=0, num_completions=2)))
    assert [(c.text, c.tokens) for c in result.completions] == [("", [])] * 2


def test_top_k_per_token_accepted(env):
    flexgen = _client(env, FLEXGEN_DEPLOYMENT)
    plain = _ok(flexgen.make_request(_request(top_k_per_token=1)))
    with_top_k = _ok(flexgen.make_request(_request(top_k_per_token=5)))
    _assert_same(with_top_k, plain)


# -- completions, sampling, stops --------------------------------------------------------------


def test_greedy_num_completions_are_copies(env):
    flexgen = _client(env, FLEXGEN_DEPLOYMENT)
    single = _ok(flexgen.make_request(_request(max_tokens=10)))
    triple = _ok(flexgen.make_request(_request(max_tokens=10, num_completions=3)))
    assert _summary(triple) == _summary(single) * 3
    for completion in triple.completions:
        assert [t.logprob for t in completion.tokens] == [t.logprob for t in single.completions[0].tokens]
    assert single.completions[0].finish_reason == {"reason": "length"} and len(single.completions[0].tokens) == 10


def test_greedy_text_matches_hf_client(env):
    flexgen, hf = _client(env, FLEXGEN_DEPLOYMENT), _client(env, HF_DEPLOYMENT)
    for prompt in PROMPTS:
        ours = _ok(flexgen.make_request(_request(prompt=prompt, max_tokens=12)))
        theirs = _ok(hf.make_request(_request(HF_DEPLOYMENT, prompt=prompt, max_tokens=12)))
        assert ours.completions[0].text == theirs.completions[0].text
        assert [t.text for t in ours.completions[0].tokens] == [t.text for t in theirs.completions[0].tokens]


def test_sampled_completions_each_carry_their_own_logprobs(env):
    """num_completions > 1 at temperature 1: every completion's token logprobs are transformers' on
    that completion's own tokens (ids recovered from the token texts where a text names one id)."""
    tokenizer = AutoTokenizer.from_pretrained(env["checkpoint"])
    hf = AutoModelForCausalLM.from_pretrained(env["checkpoint"], dtype=torch.float32).eval()
    ids_of: dict[str, list[int]] = {}
    for token_id in range(len(tokenizer)):
        ids_of.setdefault(tokenizer.decode([token_id]), []).append(token_id)
    result = _ok(_client(env, FLEXGEN_DEPLOYMENT).make_request(_request(temperature=1.0, num_completions=4, max_tokens=8)))
    assert len({c.text for c in result.completions}) > 1
    prompt_ids = tokenizer(PROMPTS[0])["input_ids"]
    checked = 0
    for completion in result.completions:
        candidates = [ids_of[t.text] for t in completion.tokens]
        if any(len(c) != 1 for c in candidates):
            continue
        ids = [c[0] for c in candidates]
        ref = reference_logprobs(hf, prompt_ids + ids)
        for step, (token_id, token) in enumerate(zip(ids, completion.tokens)):
            assert token.logprob == pytest.approx(ref[len(prompt_ids) - 1 + step, token_id].item(), abs=LOGPROB_TOLERANCE)
        checked += 1
    assert checked >= 2


def test_sampling_reproducible_and_independent_of_batch(env):
    flexgen = _client(env, FLEXGEN_DEPLOYMENT)
    sampled = _request(temperature=1.0, top_p=0.9, num_completions=3, max_tokens=10)
    first = _ok(flexgen.make_request(sampled))
    _assert_same(_ok(flexgen.make_request(sampled)), first)
    texts = [c.text for c in first.completions]
    assert len(set(texts)) > 1, "three samples at temperature 1 came out identical"
    for completion in first.completions:  # logprobs are the model's own, not temperature-processed
        assert all(t.logprob < 0 for t in completion.tokens)
    # HELM's `random` field asks for other samples.
    other = _ok(flexgen.make_request(replace(sampled, random="1")))
    assert [c.text for c in other.completions] != texts

    # The same request inside a batch of other prompts samples the same tokens.
    patient = _client(env, PATIENT_DEPLOYMENT)
    batched = [replace(sampled, model_deployment=PATIENT_DEPLOYMENT, prompt=prompt) for prompt in PROMPTS]
    batched = batched[1:] + batched[:1]
    with ThreadPoolExecutor(max_workers=len(batched)) as pool:
        futures = [pool.submit(patient.make_request, request) for request in batched]
        results = [_ok(future.result()) for future in futures]
    _assert_same(results[-1], first)
    assert max(result.batch_size for result in results) > 1


def test_multi_token_stop_sequences(env):
    """Text-level stops of several tokens, several at once, cut where HELM's client cuts."""
    flexgen, hf = _client(env, FLEXGEN_DEPLOYMENT), _client(env, HF_DEPLOYMENT)
    checked = 0
    for prompt in PROMPTS:
        full = _ok(flexgen.make_request(_request(prompt=prompt, max_tokens=16))).completions[0]
        tokens = [t.text for t in full.tokens]
        if len(tokens) < 8 or "".join(tokens) != full.text:  # a token that is part of a character
            continue
        stop = "".join(tokens[4:7])  # three generated tokens, starting at a token boundary
        cut = full.text.index(stop)
        stops = ["\u2603\u2603", stop]  # HELM's client fails on a stop longer (in tokens) than the prompt
        ours = _ok(flexgen.make_request(_request(prompt=prompt, max_tokens=16, stop_sequences=stops))).completions[0]
        theirs = _ok(hf.make_request(_request(HF_DEPLOYMENT, prompt=prompt, max_tokens=16, stop_sequences=stops)))
        assert ours.text == full.text[:cut] == theirs.completions[0].text
        assert ours.finish_reason == {"reason": "stop"}
        assert "".join(t.text for t in ours.tokens) == ours.text
        assert ours.logprob == pytest.approx(sum(t.logprob for t in ours.tokens))
        checked += 1
    assert checked >= 3


def test_stop_inside_a_token_cuts_text_and_later_tokens(env):
    """A stop string that starts inside a generated token: the text is cut there, the token that
    holds it stays (tokens are whole, as in HELM), every later token goes."""
    flexgen = _client(env, FLEXGEN_DEPLOYMENT)
    for prompt in PROMPTS:
        full = _ok(flexgen.make_request(_request(prompt=prompt, max_tokens=16))).completions[0]
        texts = [t.text for t in full.tokens]
        for index in range(1, len(texts) - 1):
            offset = len("".join(texts[:index]))
            token = texts[index]
            if len(token) < 2 or not token.isprintable() or full.text[:offset] != "".join(texts[:index]):
                continue
            stop = token[1:] + texts[index + 1]
            if full.text.find(stop) != offset + 1:  # it also occurs earlier: another case
                continue
            request = _request(prompt=prompt, max_tokens=16, stop_sequences=[stop])
            ours = _ok(flexgen.make_request(request)).completions[0]
            assert ours.text == full.text[: offset + 1]
            assert [t.text for t in ours.tokens] == texts[: index + 1]
            assert ours.finish_reason == {"reason": "stop"}
            return
    pytest.fail("no completion had a multi-character token to cut inside")


# -- concurrency and batching ------------------------------------------------------------------


def _mixed_requests(count: int) -> list[Request]:
    requests = []
    for index, prompt in enumerate((PROMPTS * count)[:count]):
        kind = index % 7
        if kind == 0:
            requests.append(_request(prompt=prompt, max_tokens=6))
        elif kind == 1:
            requests.append(_request(prompt=prompt, max_tokens=9, stop_sequences=["\n", "):"]))
        elif kind == 2:
            requests.append(_request(prompt=prompt, max_tokens=0, echo_prompt=True))
        elif kind == 3:
            requests.append(_request(prompt=prompt, max_tokens=7, temperature=0.8, num_completions=2))
        elif kind == 4:
            requests.append(_request(prompt=prompt, max_tokens=5, temperature=0.8, top_p=0.5, random=str(index)))
        elif kind == 5:
            requests.append(_request(prompt=prompt, max_tokens=4, echo_prompt=True))
        else:  # kind 0 but for its temperature: must never share kind 0's batches
            requests.append(_request(prompt=prompt, max_tokens=6, temperature=0.8))
    return requests


def test_mixed_settings_concurrently_match_requests_made_alone(env):
    """66 requests of 7 kinds at once from 66 threads through 4 client instances (as HELM builds
    them, sharing one engine): batches group equal settings only, so every result equals the one
    the same request gets when sent by itself."""
    requests = _mixed_requests(66)
    alone_client = _client(env, FLEXGEN_DEPLOYMENT)
    alone = [_ok(alone_client.make_request(request)) for request in requests]

    clients = [_client(env, PATIENT_DEPLOYMENT) for _ in range(4)]
    patient_requests = [replace(request, model_deployment=PATIENT_DEPLOYMENT) for request in requests]

    def send(index_request):
        index, request = index_request
        return clients[index % len(clients)].make_request(request)

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        results = [_ok(r) for r in pool.map(send, enumerate(patient_requests))]
    for result, expected in zip(results, alone):
        _assert_same(result, expected)
    assert max(result.batch_size for result in results) > 1
    for request, result in zip(requests, results):
        assert len(result.completions) == request.num_completions


def test_cache_hit_never_waits_for_a_batch(env):
    """On a deployment that waits 2 s for a batch to fill, a miss waits; the same request again is a
    cache hit and returns at once, without loading anything or joining a batch."""
    slow = _client(env, SLOW_DEPLOYMENT, cache="cache_slow")
    request = _request(SLOW_DEPLOYMENT, prompt=PROMPTS[1], max_tokens=3)
    started_s = time.perf_counter()
    miss = _ok(slow.make_request(request))
    miss_s = time.perf_counter() - started_s
    started_s = time.perf_counter()
    hit = _ok(slow.make_request(request))
    hit_s = time.perf_counter() - started_s
    assert not miss.cached and hit.cached
    assert miss_s >= 2.0 and hit_s < 0.5, (miss_s, hit_s)
    _assert_same(hit, miss)
    assert hit.batch_size == miss.batch_size == 1


def test_each_batch_is_cached_as_soon_as_it_finishes(env):
    """Crash safety: while the second batch runs, the first batch's results are already in HELM's
    sqlite cache (they are not held back until every request is done)."""
    small = _client(env, SMALL_DEPLOYMENT, cache="cache_small")
    cache_path = env["root"] / "cache_small" / "local-flexgen-small.sqlite"
    requests = [_request(SMALL_DEPLOYMENT, prompt=prompt, max_tokens=5) for prompt in PROMPTS[:4]]
    _ok(small.make_request(_request(SMALL_DEPLOYMENT, prompt="warm up", max_tokens=1)))  # load the engine

    handle = next(h for k, h in client_module.ENGINES._handles.items() if k.policy.block_size == 2)
    original_run = handle.batcher._run_batch
    rows_at_batch_start = []

    def cached_rows() -> int:
        with sqlite3.connect(cache_path) as connection:
            return connection.execute("SELECT COUNT(*) FROM unnamed").fetchone()[0]

    def observing_run(settings, prompts, seeds):
        if rows_at_batch_start:  # batches after the first: wait (bounded) for the earlier ones' rows
            expected = 1 + 2 * len(rows_at_batch_start)
            deadline_s = time.monotonic() + 10
            while cached_rows() < expected and time.monotonic() < deadline_s:
                time.sleep(0.02)
        rows_at_batch_start.append(cached_rows())
        return original_run(settings, prompts, seeds)

    handle.batcher._run_batch = observing_run
    try:
        with ThreadPoolExecutor(max_workers=len(requests)) as pool:
            results = [_ok(r) for r in pool.map(small.make_request, requests)]
    finally:
        handle.batcher._run_batch = original_run
    assert [r.batch_size for r in results] == [2, 2, 2, 2]
    assert rows_at_batch_start == [1, 3], rows_at_batch_start  # warm-up row, then + the first batch
    assert cached_rows() == 5


# -- failures ----------------------------------------------------------------------------------


def test_prompt_too_long_is_not_retried_and_not_fatal(env):
    flexgen = _client(env, FLEXGEN_DEPLOYMENT)
    result = flexgen.make_request(_request(prompt="word " * 400, max_tokens=8))
    assert not result.success and "positions" in result.error
    assert result.error_flags.is_retriable is False and result.error_flags.is_fatal is False


@pytest.mark.parametrize("fields, named", [
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"), (dict(num_completions=10**9, temperature=1.0), "num_completions"),
    (dict(num_completions=10**9, temperature=0.0, max_tokens=0), "num_completions"),
    (dict(max_tokens=-1), "max_tokens")])
def test_bad_decoding_parameters_fail_that_request_only(env, fields, named):
    """Each is refused before any work as that request's own failure, not retried and not fatal; the
    client serves the next request."""
    flexgen = _client(env, FLEXGEN_DEPLOYMENT)
    result = flexgen.make_request(_request(**fields))
    assert not result.success and named in result.error, result.error
    assert result.error_flags.is_retriable is False and result.error_flags.is_fatal is False
    _ok(flexgen.make_request(_request(max_tokens=2)))


def test_tiny_temperature_and_top_p_are_their_greedy_limit(env):
    flexgen = _client(env, FLEXGEN_DEPLOYMENT)
    greedy = _summary(_ok(flexgen.make_request(_request(max_tokens=4))))
    for fields in (dict(temperature=1e-46), dict(temperature=1.0, top_p=1e-300), dict(temperature=5e-324)):
        assert _summary(_ok(flexgen.make_request(_request(max_tokens=4, **fields)))) == greedy, fields


@pytest.mark.parametrize(
    "deployment, message",
    [
        (BAD_POLICY_DEPLOYMENT, "w_gpu_pct"),
        (MISSING_MODEL_DEPLOYMENT, "no-such-checkpoint"),
        (BAD_LOG_DEPLOYMENT, "a-folder"),
        (BAD_COMPRESS_DEPLOYMENT, "compress goes with policy: auto"),
    ],
)
def test_bad_configuration_is_fatal_and_not_retried(env, deployment, message):
    client = _client(env, deployment)
    result = client.make_request(_request(deployment))
    assert not result.success and message in result.error, result.error
    assert result.error_flags.is_retriable is False and result.error_flags.is_fatal is True


def _fault_engine():
    return next(h.engine for k, h in client_module.ENGINES._handles.items() if k.batch_wait_s == 0.02)


def test_corrupt_weights_fail_the_run_entry_and_nothing_is_cached(env):
    """NaN bytes in an offload weight file: a fatal, non-retriable failure naming the layer and the
    file; HELM's cache keeps nothing of it, so the request is computed again once the file is good."""
    client = _client(env, FAULT_DEPLOYMENT, cache="cache_faults")
    _ok(client.make_request(_request(FAULT_DEPLOYMENT, prompt="warm up", max_tokens=1)))
    engine = _fault_engine()
    layer_idx = next(i for i, f in enumerate(engine.weights.disk_files) if f is not None and i > 0)
    path = engine.weights.disk_files[layer_idx].path
    with open(path, "r+b") as f:
        original = f.read(64)
        f.seek(0)
        f.write(b"\xff" * 64)
    request = _request(FAULT_DEPLOYMENT, prompt=PROMPTS[2], max_tokens=4)
    try:
        failed = client.make_request(request)
    finally:
        with open(path, "r+b") as f:
            f.write(original)
    assert not failed.success and f"offload file {path}" in failed.error and "NaN" in failed.error
    assert failed.error_flags.is_retriable is False and failed.error_flags.is_fatal is True
    again = _ok(client.make_request(request))
    assert not again.cached
    _assert_same(again, _ok(_client(env, FLEXGEN_DEPLOYMENT).make_request(replace(request, model_deployment=FLEXGEN_DEPLOYMENT))))


def test_a_transient_os_error_fails_only_its_batch(env, monkeypatch):
    """The disk full for a moment (ENOSPC on an offload write): that batch's requests fail, retriable
    and not fatal for the run entry; the engine serves the next batch. A missing file (ENOENT) is
    not worth a retry."""
    import errno

    from flexgen_core.runtime import storage

    client = _client(env, FAULT_DEPLOYMENT)
    request = _request(FAULT_DEPLOYMENT, prompt=PROMPTS[3], max_tokens=4)
    expected = _ok(client.make_request(request))
    real = os.pwrite
    for code, retriable in ((errno.ENOSPC, True), (errno.ENOENT, False)):
        def failing(fd, data, offset, code=code):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(storage.os, "pwrite", failing)
        failed = client.make_request(request)
        monkeypatch.setattr(storage.os, "pwrite", real)
        assert not failed.success and "offload file" in failed.error and os.strerror(code) in failed.error
        assert failed.error_flags.is_retriable is retriable and failed.error_flags.is_fatal is False
        _assert_same(_ok(client.make_request(request)), expected)


def test_progress_per_batch_and_a_summary_per_burst(env, caplog):
    """A line per batch (requests done of those seen, ETA for the waiting ones) and, once requests stop
    coming, one summary: computed vs from HELM's cache, batches and their sizes, prefill/decode seconds."""
    import logging

    client = _client(env, PATIENT_DEPLOYMENT, cache="cache_progress")
    requests = [_request(PATIENT_DEPLOYMENT, prompt=prompt, max_tokens=3) for prompt in PROMPTS]
    _ok(client.make_request(requests[0]))  # cached from now on
    progress = client_module.PROGRESS.get(client._engine_key)
    progress.flush()  # a clean slate: what follows is one burst
    caplog.set_level(logging.INFO, logger="helm")
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        results = [_ok(r) for r in pool.map(client.make_request, requests)]
    deadline_s = time.monotonic() + 10 * progress.quiet_s
    mine = f"requests to {PATIENT_DEPLOYMENT} in"
    while not any(mine in r.getMessage() for r in caplog.records) and time.monotonic() < deadline_s:
        time.sleep(0.05)
    lines = [r.getMessage().strip() for r in caplog.records if "FlexGen:" in r.getMessage()]
    batches = [line for line in lines if line.startswith("FlexGen: [") and f"requests to {PATIENT_DEPLOYMENT}]" in line]
    computed = sum(not r.cached for r in results)
    assert computed == len(PROMPTS) - 1 and sum(r.cached for r in results) == 1
    sizes = sorted({r.batch_size for r in results if not r.cached})
    assert batches and all(re.match(rf"FlexGen: \[\d+/6 requests to {PATIENT_DEPLOYMENT}\] batch of \d+ prompts", b)
                           for b in batches)
    assert batches[-1].startswith(f"FlexGen: [6/6 requests to {PATIENT_DEPLOYMENT}]") and batches[-1].endswith("none waiting")
    (summary,) = [line for line in lines if mine in line]
    assert re.match(rf"FlexGen: 6 requests to {PATIENT_DEPLOYMENT} in [0-9.]+ s: {computed} computed in "
                    rf"{len(batches)} batches \(mean [0-9.]+, largest {max(sizes)} requests\); 1 from HELM's cache; "
                    r"exact results \(no compression\); prefill [0-9.]+ s, decode [0-9.]+ s, \d+ tokens generated", summary), summary


def test_chat_messages_are_rejected(env):
    result = _client(env, FLEXGEN_DEPLOYMENT).make_request(
        _request(prompt="", messages=[{"role": "user", "content": "hi"}])
    )
    assert not result.success and result.error_flags.is_retriable is False


def test_policy_auto_is_planned_for_the_first_batch(env, tmp_path, monkeypatch):
    """`policy: auto` plans when the first batch is formed, for its shape: the longest prompt, its
    max_tokens, its number of sequences and the prefix its prompts share; results are the engine's."""
    from flexgen_core import Engine
    from test_planner import cpu_host

    monkeypatch.setenv("FLEXGEN_HARDWARE", str(cpu_host().save(tmp_path / "host.json")))
    planned = []
    from_pretrained = Engine.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        planned.append(kwargs)
        return from_pretrained(cls, *args, **kwargs)

    monkeypatch.setattr(Engine, "from_pretrained", classmethod(recording))
    instructions = "Answer the question with one word from the garden.\n" * 3
    requests = [_request(AUTO_DEPLOYMENT, prompt=instructions + prompt, max_tokens=5) for prompt in PROMPTS]
    client = _client(env, AUTO_DEPLOYMENT)
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        results = [_ok(r) for r in pool.map(client.make_request, requests)]
    alone = _client(env, FLEXGEN_DEPLOYMENT)
    for request, result in zip(requests, results):
        _assert_same(result, _ok(alone.make_request(replace(request, model_deployment=FLEXGEN_DEPLOYMENT))))
    (hints,) = [kwargs for kwargs in planned if kwargs.get("policy") == "auto"]
    tokenizer = AutoTokenizer.from_pretrained(env["checkpoint"])
    ids = [tokenizer(r.prompt)["input_ids"] for r in requests]
    common = next(i for i in range(min(map(len, ids))) if len({tuple(t[:i + 1]) for t in ids}) > 1)
    assert hints["prompt_len_hint"] == max(map(len, ids)) and hints["gen_len_hint"] == 5
    assert hints["num_prompts_hint"] == len(requests) and hints["shared_prefix_len_hint"] == common > 16
    assert hints["compress"] == "never"  # exact unless the deployment says `compress: allow`
    assert max(r.batch_size for r in results) == len(requests)  # the first batch took everything waiting


def test_auto_plans_again_for_a_new_run_entry_on_the_loaded_weights(env, tmp_path, monkeypatch):
    """Two run entries of other max_tokens: two plans, one load of the weights (their placement is
    the same), and the second entry's results are the model's as a fixed policy computes them."""
    import flexgen_core.plan.auto as search
    from flexgen_core import Engine
    from test_planner import cpu_host

    monkeypatch.setenv("FLEXGEN_HARDWARE", str(cpu_host().save(tmp_path / "host.json")))
    loads, plans = [], []
    from_pretrained, plan_for_engine = Engine.from_pretrained.__func__, search.plan_for_engine

    def recording_load(cls, *args, **kwargs):
        loads.append(kwargs)
        return from_pretrained(cls, *args, **kwargs)

    def recording_plan(*args, **kwargs):
        plans.append((kwargs["prompt_len"], kwargs["gen_len"], kwargs["num_prompts"]))
        return plan_for_engine(*args, **kwargs)

    monkeypatch.setattr(Engine, "from_pretrained", classmethod(recording_load))
    monkeypatch.setattr(search, "plan_for_engine", recording_plan)
    client = _client(env, REPLAN_DEPLOYMENT)
    answered = []
    for max_tokens in (1, 12):
        requests = [_request(REPLAN_DEPLOYMENT, prompt=p, max_tokens=max_tokens) for p in PROMPTS[:4]]
        with ThreadPoolExecutor(max_workers=len(requests)) as pool:
            answered += zip(requests, [_ok(r) for r in pool.map(client.make_request, requests)])
    assert [gen_len for _, gen_len, _ in plans] == [1, 12], plans
    assert len([kwargs for kwargs in loads if kwargs.get("policy") == "auto"]) == 1
    # (The fixed-policy client loads the same checkpoint, which unloads the idle auto engine: last.)
    alone = _client(env, FLEXGEN_DEPLOYMENT)
    for request, result in answered:
        _assert_same(result, _ok(alone.make_request(replace(request, model_deployment=FLEXGEN_DEPLOYMENT))))


def test_client_is_cheap_to_build(env):
    """HELM builds clients eagerly and concurrently: construction loads nothing."""
    loaded_before = len(client_module.ENGINES._handles)
    started_s = time.perf_counter()
    clients = [_client(env, SLOW_DEPLOYMENT) for _ in range(4)]
    assert time.perf_counter() - started_s < 2.0
    assert all(isinstance(c, FlexGenClient) for c in clients)
    assert len(client_module.ENGINES._handles) == loaded_before
