"""The chat engine's continuous batching: rows with their own routes in one decode step, joining
and leaving between steps, against each request run alone."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from server.chat.batching import ChatEngine, DeadlineExceeded
from server.chat.decoding import ChatJob, DecodeBatch, Decoding, batchable, generate, prefill
from server.chat.model import load_chat
from server.chat.moe_lora import MoELoRAConfig
from server.chat.router import plan_route
from server.chat.stack_files import save_stack
from server.chat.stacks import load_domain_stacks
from server.engine import QueueFull
from server.manifest import ArtifactResolver, load_manifest
from server.metrics import Metrics
from training.brainstacks.stacks import add_stack, freeze, remove_last_stack, stack_modules

ROUTES = ({}, {"math": 1.0}, {"chat": 0.7, "math": 0.4}, {"chat": 1.0})
PROMPTS = ("What is 3 + 4?", "Name a colour", "Tell me something about the sea and the sky", "hi")


def chat_with_stacks(manifest_path, tmp_path, quantization: str):
    """The tiny chat model with a random, non-zero frozen stack for each of two domains."""
    manifest = load_manifest(manifest_path)
    section = manifest.chat.model_copy(update={
        "base": manifest.chat.base.model_copy(update={"quantization": quantization}), "domains": []})
    chat = load_chat(section, ArtifactResolver(manifest_path.parent), "cpu")
    config = MoELoRAConfig(experts=4, rank=4, alpha=4.0)
    for seed, domain in enumerate(("chat", "math")):
        stacks = add_stack(chat.model, domain, config, seed=seed)
        torch.manual_seed(seed)
        for stack in stacks:
            torch.nn.init.normal_(stack.lora_B, std=0.5)
        freeze(stacks)
        path = tmp_path / f"{domain}.safetensors"
        save_stack(path, stack_modules(chat.model, domain, 0), domain, config, {"round": 1})
        remove_last_stack(chat.model, domain)  # served stacks live outside the base, mounted per step
        chat.stacks[domain] = load_domain_stacks(chat.model, domain, [path])
    chat.domains = ("chat", "math")
    return chat


def job(prompt: str, route, max_new_tokens: int = 6, **kw) -> ChatJob:
    return ChatJob([{"role": "user", "content": prompt}], max_new_tokens, kw.pop("temperature", 0.0),
                   kw.pop("top_p", 1.0), kw.pop("seed", 0), route, **kw)


def started_engine(**settings) -> ChatEngine:
    engine = ChatEngine("chat", **{"max_batch": 8, "max_waiting": 8, "retry_after": 1, "metrics": Metrics()} | settings)
    engine.start()
    return engine


def transformers_generate(chat, job: ChatJob, weights: dict) -> tuple[str, int]:
    """transformers' own greedy `generate`, one request alone with the same stacks mounted: the
    reference for the engine's decoding. The answer's text and its length in tokens."""
    ids = chat.encode(job.messages)
    with chat.mounted(weights), torch.no_grad():
        out = chat.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=job.max_new_tokens,
                                  do_sample=False, min_new_tokens=job.min_tokens or None, top_p=None, top_k=None,
                                  pad_token_id=chat.tokenizer.pad_token_id, eos_token_id=list(chat.end_of_turn_ids))
    tokens = out[0, ids.shape[1]:].tolist()
    return chat.decode(tokens).strip(), len(tokens)


def fed(row: Decoding, token: int) -> Decoding:
    """Teacher forcing: the row's next input is this token, whatever it sampled."""
    row.tokens.append(token)
    return row


def alone_logits(chat, prompt, route, forced: list[int]) -> list[torch.Tensor]:
    """Teacher forcing, one request alone: the logits after the prompt and after each forced token."""
    batch = DecodeBatch(chat, 1)
    row = Decoding(chat, job(prompt, route))
    logits, row.cache = prefill(chat, chat.encode(row.job.messages), route)
    row.plan = plan_route(route, chat.domains, {d: 1 for d in chat.domains}, None, None)
    batch.join(row)
    out = [logits]
    for token in forced:
        fed(row, token)
        out.append(batch.step()[0])
    return out


@pytest.fixture(scope="module")
def gemma3_manifest(tmp_path_factory):
    """A tiny Gemma-3-shaped chat base: sliding-window layers (a window of 8) between full ones."""
    from server.manifest import ChatBase, ChatSection, Manifest, write_manifest
    from tests.builders import build_causal_lm
    from tests.conftest import recorded_source

    root = tmp_path_factory.mktemp("gemma3")
    build_causal_lm(root / "lm", "gemma3")
    section = ChatSection(base=ChatBase(name="tiny-gemma3", source=recorded_source(root, "lm"), quantization="none"))
    write_manifest(Manifest(version=1, image=[], chat=section), root / "weights_manifest.yaml")
    return root / "weights_manifest.yaml"


@pytest.mark.parametrize("base, quantization", [("llama", "none"), ("llama", "nf4"), ("gemma3", "none")])
def test_each_row_of_a_mixed_route_batch_matches_its_request_alone(manifest_path, gemma3_manifest, tmp_path,
                                                                  base, quantization):
    chat = chat_with_stacks(manifest_path if base == "llama" else gemma3_manifest, tmp_path, quantization)
    if base == "gemma3":  # prompts longer than the window and shorter, all past it as they decode, batched
        lengths = [chat.encode(job(p, {}).messages).shape[1] for p in PROMPTS]
        assert min(lengths) < chat.model.config.sliding_window < max(lengths)
        assert batchable(prefill(chat, chat.encode(job(PROMPTS[0], {}).messages), {})[1])
    torch.manual_seed(0)
    forced = [torch.randint(0, chat.model.config.vocab_size, (8,)).tolist() for _ in PROMPTS]
    alone = [alone_logits(chat, p, r, f) for p, r, f in zip(PROMPTS, ROUTES, forced)]
    # the same requests in one batch: row k joins at step 2k (so prompts and joins interleave with
    # decoding), the second leaves after 4 tokens; every step compares each row with its own run
    batch = DecodeBatch(chat, 8)
    position = {}  # row index -> tokens fed so far
    which = {}  # id(row) -> its index
    worst = 0.0
    for step in range(14):
        if step % 2 == 0 and step // 2 < len(PROMPTS):
            k = step // 2
            row = Decoding(chat, job(PROMPTS[k], ROUTES[k]))
            row.plan = plan_route(ROUTES[k], chat.domains, {d: 1 for d in chat.domains}, None, None)
            which[id(row)] = k
            logits, row.cache = prefill(chat, chat.encode(row.job.messages), ROUTES[k])
            worst = max(worst, (logits - alone[k][0]).abs().max().item())
            batch.join(row)
            position[k] = 0
        rows = [which[id(r)] for r in batch.rows]
        for row, k in zip(batch.rows, rows):
            fed(row, forced[k][position[k]])
        logits = batch.step()
        for i, k in enumerate(rows):
            position[k] += 1
            worst = max(worst, (logits[i] - alone[k][position[k]]).abs().max().item())
        batch.keep([i for i, k in enumerate(rows)
                    if position[k] < len(forced[k]) and not (k == 1 and position[k] == 4)])
    assert position == {0: 8, 1: 4, 2: 8, 3: 8}
    scale = max(a.abs().max().item() for rows in alone for a in rows)
    # the same math in other shapes: measured 6e-7 (float32) and 5e-7 (NF4, bitsandbytes' CPU
    # kernels) of the logits' scale; left padding without each row's own positions fails this
    assert worst <= 1e-5 * scale, (worst, scale)


def run(coro):
    return asyncio.run(coro)


def answered_together(engine: ChatEngine, chat, jobs: list[ChatJob]) -> list:
    """Every job submitted at once to a started engine, their results; the engine shut down after."""
    async def together():
        return await asyncio.gather(*(engine.submit(chat, j) for j in jobs))
    try:
        return asyncio.run(together())
    finally:
        engine.shutdown()


def test_concurrent_requests_share_steps_and_answer_as_each_alone(manifest_path, tmp_path):
    chat = chat_with_stacks(manifest_path, tmp_path, "none")
    jobs = [job(p, r, max_new_tokens=n) for p, r, n in zip(PROMPTS, ROUTES, (9, 4, 12, 7))]
    unstopped = generate(chat, job("Count: one two", {"math": 1.0}, max_new_tokens=12), {"math": 1.0}).text
    assert len(unstopped) > 8
    jobs.append(job("Count: one two", {"math": 1.0}, max_new_tokens=12, stop=(unstopped[4:7],)))
    jobs.append(job("Say something", {"chat": 0.5}, max_new_tokens=10, temperature=0.9, top_p=0.8, seed=11))
    metrics = Metrics()
    chat_engine = started_engine(metrics=metrics)
    try:
        async def together():
            return await asyncio.gather(*(chat_engine.submit(chat, j) for j in jobs))
        results = run(together())
        sampled_again = run(chat_engine.submit(chat, jobs[-1]))
    finally:
        chat_engine.shutdown()
    steps = metrics.registry.get_sample_value("loopstack_chat_batch_rows_count")
    rows = metrics.registry.get_sample_value("loopstack_chat_batch_rows_sum")
    assert rows / steps > 2  # requests really decoded together
    for j, result in zip(jobs[:-2], results):  # greedy, no stop sequence: transformers' generate is the reference
        assert (result.text, result.completion_tokens) == transformers_generate(chat, j, j.route), j
        assert result.finish_reason == ("length" if result.completion_tokens == j.max_new_tokens else "stop")
    for j, result in zip(jobs[:-1], results):
        alone = generate(chat, j, j.route)  # the engine's steps, one request alone
        assert (result.text, result.completion_tokens, result.finish_reason) == (
            alone.text, alone.completion_tokens, alone.finish_reason), j
        assert result.plan.weights == j.route and len(result.token_times) == result.completion_tokens
    stopped = results[-2]
    assert stopped.finish_reason == "stop" and stopped.text == unstopped[:unstopped.index(unstopped[4:7])].strip()
    assert results[1].completion_tokens == 4 and results[1].finish_reason == "length"
    assert sampled_again.text == results[-1].text  # a sampled row follows its own seed, whatever the batch


def test_a_departed_client_and_a_passed_deadline_leave_the_batch(manifest_path, tmp_path):
    chat = chat_with_stacks(manifest_path, tmp_path, "none")
    chat.model.generation_config.eos_token_id = None  # long answers: no end of turn stops them early
    chat.tokenizer.eos_token_id = None
    engine = started_engine(max_batch=4, max_waiting=0, timeout=0.3)
    try:
        with pytest.raises(DeadlineExceeded):
            run(engine.submit(chat, job("hi", {}, max_new_tokens=100_000)))
        gone = threading.Event()

        async def leave_after_first_step():
            task = asyncio.ensure_future(engine.submit(chat, job("hi", {"math": 1.0}, max_new_tokens=100_000)))
            while engine.running == 0:
                await asyncio.sleep(0.01)
            task.cancel()  # what the server does when the client disconnects
            gone.set()
            with pytest.raises(asyncio.CancelledError):
                await task
        engine.timeout = None
        run(leave_after_first_step())
        deadline = time.time() + 5
        while engine.running and time.time() < deadline:
            time.sleep(0.01)
        assert gone.is_set() and engine.running == 0  # the row left at the next step

        async def overfill():  # four decode together, none may wait: the fifth is refused at once
            tasks = [asyncio.ensure_future(engine.submit(chat, job("hi", {}, max_new_tokens=30))) for _ in range(4)]
            await asyncio.sleep(0)
            with pytest.raises(QueueFull):
                await engine.submit(chat, job("hi", {}, max_new_tokens=30))
            return await asyncio.gather(*tasks)
        assert [r.completion_tokens for r in run(overfill())] == [30] * 4
    finally:
        engine.shutdown()


def test_min_tokens_holds_off_the_end_of_turn_as_transformers_min_new_tokens_does(manifest_path, tmp_path):
    chat = chat_with_stacks(manifest_path, tmp_path, "none")
    prompt = chat.encode([{"role": "user", "content": "Name a colour"}])
    greedy = chat.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False,
                                 pad_token_id=chat.tokenizer.pad_token_id)[0, prompt.shape[1]:].tolist()
    chat.model.generation_config.eos_token_id = greedy[2]  # the answer now ends by its third token
    chat_engine = started_engine(max_batch=2, max_waiting=2)
    try:
        ended = run(chat_engine.submit(chat, job("Name a colour", {}, max_new_tokens=8)))
        held = run(chat_engine.submit(chat, job("Name a colour", {}, max_new_tokens=8, min_tokens=8)))
    finally:
        chat_engine.shutdown()
    assert ended.finish_reason == "stop" and ended.completion_tokens <= 3
    assert (held.finish_reason, held.completion_tokens) == ("length", 8)
    assert (held.text, 8) == transformers_generate(chat, job("Name a colour", {}, max_new_tokens=8, min_tokens=8), {})


def test_a_stream_closed_early_takes_its_row_out_of_the_batch(manifest_path, tmp_path):
    from server.chat.streamed import stream_listener

    chat = chat_with_stacks(manifest_path, tmp_path, "none")
    chat.model.generation_config.eos_token_id = None  # no end of turn: only the closed stream ends it
    chat.tokenizer.eos_token_id = None
    engine = started_engine(max_batch=2, max_waiting=0)
    try:
        async def read_then_close():
            row = engine.enqueue(chat, job("Tell me a story", {"math": 1.0}, max_new_tokens=100_000), stream_listener())
            stream = engine.stream(row)
            pieces = [await anext(stream) for _ in range(3)]
            await stream.aclose()
            return row, pieces
        row, pieces = run(read_then_close())
        assert all(isinstance(p, str) and p for p in pieces) and row.cancelled
        deadline = time.time() + 10
        while engine.running and time.time() < deadline:
            time.sleep(0.05)
        assert engine.running == 0 and len(row.tokens) < 1000
    finally:
        engine.shutdown()


def test_sampling_at_a_vanishing_temperature_is_greedy_and_at_one_follows_the_softmax():
    from server.chat.decoding import sample

    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    for temperature in (1e-300, 1e-30, 1e-6):  # schema-valid; the unshifted division overflowed to nan
        assert {sample(logits, temperature, top_p, torch.Generator().manual_seed(s))
                for s in range(20) for top_p in (1.0, 0.5)} == {1}
    draws = [sample(logits, 1.0, 1.0, torch.Generator().manual_seed(s)) for s in range(2000)]
    shares = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    torch.testing.assert_close(shares, torch.softmax(logits, 0), atol=0.03, rtol=0)


def test_a_prompt_read_in_parts_gives_what_one_pass_gives(manifest_path, tmp_path):
    """The prefill and the meta-router's read in parts (as the engine interleaves them with other
    rows' steps) against one pass over the whole prompt."""
    from server.chat.router import MetaRouter, RouterConfig

    chat = chat_with_stacks(manifest_path, tmp_path, "none")
    ids = chat.encode([{"role": "user", "content": " ".join(PROMPTS * 3)}])
    whole, whole_cache = prefill(chat, ids, {"math": 1.0})
    cache, start = None, 0
    while start < ids.shape[1]:
        end = min(start + 7, ids.shape[1])
        logits, cache = prefill(chat, ids, {"math": 1.0}, cache, start, end)
        start = end
    assert cache.get_seq_length() == whole_cache.get_seq_length() == ids.shape[1] > 21
    torch.testing.assert_close(logits, whole, atol=1e-5 * whole.abs().max().item(), rtol=0)
    torch.manual_seed(0)
    chat.router = MetaRouter(RouterConfig(domains=("chat", "math"), hidden_size=chat.model.config.hidden_size,
                                          middle_layer=1)).eval()
    one = chat.router_pass(ids)
    one.advance()
    parts = chat.router_pass(ids)
    while parts.remaining:
        parts.advance(5)
    assert one.probabilities() == pytest.approx(parts.probabilities(), abs=1e-5)


def test_a_long_prompt_does_not_hold_back_a_short_requests_first_token(manifest_path, tmp_path):
    chat = chat_with_stacks(manifest_path, tmp_path, "none")
    engine = started_engine(max_batch=4, prefill_tokens=8)
    long_prompt = " ".join(PROMPTS * 8)  # hundreds of tokens: dozens of parts of 8
    try:
        async def long_then_short():
            long = asyncio.ensure_future(engine.submit(chat, job(long_prompt, {"math": 1.0}, max_new_tokens=3)))
            await asyncio.sleep(0)  # the long one is queued first
            short = asyncio.ensure_future(engine.submit(chat, job("hi", {}, max_new_tokens=3)))
            return await asyncio.gather(long, short)
        long, short = run(long_then_short())
    finally:
        engine.shutdown()
    assert long.prompt_tokens > 20 * 8 and short.token_times[0] < long.token_times[0]
    alone = generate(chat, job(long_prompt, {"math": 1.0}, max_new_tokens=3), {"math": 1.0})  # one pass
    assert (long.text, long.completion_tokens) == (alone.text, alone.completion_tokens)


def test_a_row_that_read_a_long_prompt_hands_its_memory_back_when_it_leaves(manifest_path, tmp_path, monkeypatch):
    from server.chat import batching

    chat = chat_with_stacks(manifest_path, tmp_path, "none")
    returned = []
    monkeypatch.setattr(batching, "return_freed_memory", lambda: returned.append(1))
    monkeypatch.setattr(batching, "LONG_PROMPT_TOKENS", 40)
    engine = started_engine(max_batch=2)
    try:
        run(engine.submit(chat, job("hi", {}, max_new_tokens=3)))
        assert returned == []  # a short prompt keeps what malloc holds
        run(engine.submit(chat, job(" ".join(PROMPTS * 2), {}, max_new_tokens=3)))
    finally:
        engine.shutdown()
    assert returned == [1]
