"""32 concurrent streaming clients (the official AsyncOpenAI) all get complete answers equal to the offline
engine's greedy output for the same prompts."""
from __future__ import annotations

import asyncio

import openai

from tests.checkpoints import PARAGRAPH

NUM_CLIENTS = 32
MAX_TOKENS = 16


def _prompts() -> list[str]:
    words = PARAGRAPH.split()
    return [" ".join(words[i:i + 3 + i % 7]) for i in range(NUM_CLIENTS)]


async def _stream_one(client: openai.AsyncOpenAI, prompt: str, chat: bool) -> tuple[str, str, int]:
    if chat:
        stream = await client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=MAX_TOKENS,
            stream=True, stream_options={"include_usage": True})
        pieces, finish, usage = [], None, None
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage.completion_tokens
            for c in chunk.choices:
                pieces.append(c.delta.content or "")
                finish = c.finish_reason or finish
        return "".join(pieces), finish, usage
    stream = await client.completions.create(model="tiny-llama", prompt=prompt, temperature=0, max_tokens=MAX_TOKENS,
                                             stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage.completion_tokens
        for c in chunk.choices:
            pieces.append(c.text)
            finish = c.finish_reason or finish
    return "".join(pieces), finish, usage


def test_32_concurrent_streams_match_offline(server, offline_llm):
    from ferry import SamplingParams

    prompts = _prompts()
    chat_ids = [offline_llm.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    expected_text = offline_llm.generate(prompts, params, use_tqdm=False)
    expected_chat = offline_llm.generate([{"prompt_token_ids": ids} for ids in chat_ids], params, use_tqdm=False)

    async def run() -> list[tuple[str, str, int]]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        try:
            # half completions, half chat, all at once
            return await asyncio.gather(*(_stream_one(client, p, chat=i % 2 == 1) for i, p in enumerate(prompts)))
        finally:
            await client.close()

    results = asyncio.run(run())
    for i, (text, finish, num_tokens) in enumerate(results):
        ref = (expected_chat if i % 2 else expected_text)[i].outputs[0]
        assert (text, finish, num_tokens) == (ref.text, ref.finish_reason, len(ref.token_ids)), f"client {i}"
    assert server.wait_idle()["ferry_kv_blocks_used"] == 0
