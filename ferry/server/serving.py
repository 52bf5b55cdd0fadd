"""The OpenAI endpoints' logic: request -> the engine's input processor (prompt token ids + SamplingParams,
validated once, ferry/engine/inputs.py) -> engine streams -> response.

Nothing here blocks the event loop: tokenization and chat templates run in worker threads, the model runs on
the engine's own thread. Errors before the first output (bad request, context length, overload) become
HTTP errors; after a stream has started they become an SSE error event."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, AsyncGenerator, Callable

from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from ferry.errors import FerryError, InvalidRequest, RequestFailed
from ferry.request import RequestOutput
from ferry.server.errors import BadRequest, ModelNotFound, RequestTimeout, error_response
from ferry.server.lifecycle import ClientDisconnected, EventStreamResponse, merge_outputs, until_disconnect
from ferry.server.metrics import RequestClock, ServerMetrics
from ferry.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from ferry.server.streaming import (DONE, ChunkWriter, DeltaTracker, TokenTexts, chat_logprobs, completion_logprobs,
                                   error_event, usage, visible_logprobs)
from ferry.server.workers import TokenizerWork

if TYPE_CHECKING:
    from ferry.engine.async_engine import AsyncLLM
    from ferry.engine.inputs import ProcessedPrompt

log = logging.getLogger("ferry.server")

Merged = AsyncGenerator[tuple[int, RequestOutput], None]


class Serving:
    def __init__(self, engine: "AsyncLLM", model_name: str, metrics: ServerMetrics, request_timeout: float,
                 work: TokenizerWork | None = None) -> None:
        self.engine = engine
        self.work = work or TokenizerWork()
        self.model_name = model_name
        self.metrics = metrics
        self.request_timeout = request_timeout
        # logprobs name every token, special ones included
        self.texts = TokenTexts(lambda ids: engine.tokenizer.decode(ids, skip_special_tokens=False))

    # -- prompts ----------------------------------------------------------------------------------

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.model_name:
            raise ModelNotFound(f"the model {requested!r} does not exist; this server serves {self.model_name!r}",
                                param="model")

    # -- endpoints --------------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, receive: Receive) -> Response:
        self.check_model(body.model)
        params = body.sampling_params(body.max_tokens, body.logprobs, self.engine.inputs.sampling_defaults)
        prompts = [await self.engine.process(p, params, fit_max_tokens=True)
                   for p in body.prompts()]
        return await self._serve("completion", body, prompts, receive)

    async def chat(self, body: ChatCompletionRequest, receive: Receive) -> Response:
        self.check_model(body.model)
        messages = {"messages": body.template_messages(), "add_generation_prompt": body.add_generation_prompt}
        prompt = await self.engine.process(messages, body.sampling_params(body.max_new_tokens, body.num_logprobs,
                                                                     self.engine.inputs.sampling_defaults),
                                           fit_max_tokens=True)
        return await self._serve("chat", body, [prompt], receive)

    async def tokenize(self, body: TokenizeRequest) -> Response:
        """Bounded like a prompt (its text must be able to fit the context) and run on the bounded tokenizer
        pool (429 when full), so a flood of large calls cannot starve the engine or the event loop. The pool
        also writes the JSON answer: tens of thousands of ids take the event loop ~15 ms to encode."""
        self.check_model(body.model)
        inputs = self.engine.inputs
        if body.messages is not None:
            msgs = [{"role": m.role, "content": m.text()} for m in body.messages]
            inputs.check_text_size(sum(len(m["content"]) for m in msgs))
            answer = await self.work.run(self._tokenize_answer, inputs.render_chat, msgs, body.add_generation_prompt)
        else:
            inputs.check_text_size(len(body.prompt or ""))
            # no prompt rules: an empty text is 0 tokens
            answer = await self.work.run(self._tokenize_answer, self.engine.tokenizer.encode, body.prompt or "")
        return Response(answer, media_type="application/json")

    def _tokenize_answer(self, encode: Callable[..., list[int]], *args) -> bytes:
        ids = list(encode(*args))
        return json.dumps({"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids},
                          separators=(",", ":")).encode()

    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        self.check_model(body.model)
        try:
            self.engine.inputs.check_token_ids(body.tokens)
        except InvalidRequest as e:
            raise BadRequest(str(e), param="tokens") from None
        text = await self.work.run(self._decode_all, body.tokens)
        return {"prompt": text}  # special tokens kept, as vLLM's /detokenize

    def _decode_all(self, ids: list[int]) -> str:
        return self.engine.tokenizer.decode(ids, skip_special_tokens=False)

    # -- one request, streamed or not -------------------------------------------------------------

    async def _serve(self, kind: str, body: CompletionRequest | ChatCompletionRequest, prompts: list["ProcessedPrompt"],
                     receive: Receive) -> Response:
        response_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        prompts = [replace(p, user=body.user) for p in prompts]  # the client, for --scheduling-policy fair
        streams = [self.engine.generate(p, None, f"{response_id}-{i}", priority=body.priority)
                   for i, p in enumerate(prompts)]
        call = Call(kind, response_id, body, [p.prompt_token_ids for p in prompts], merge_outputs(streams),
                    [self.metrics.clock() for _ in prompts],
                    asyncio.get_running_loop().time() + self.request_timeout)
        try:
            if body.stream:
                # The first output (or the error) comes before the headers, so overload and bad prompts get
                # a real status code instead of a 200 with an error event.
                first = await until_disconnect(self._next(call), receive)
                if first is None or _failed(first[1]):
                    raise RequestFailed(first[1].error if first and first[1].error else "the engine ended the request "
                                        "without output")
                return EventStreamResponse(self._events(call, first))
            finals = await until_disconnect(self._collect(call), receive)
        except BaseException as e:
            await call.merged.aclose()
            if isinstance(e, ClientDisconnected):
                self.metrics.count_aborts(len(prompts) * body.n)  # per choice, as finished ones are counted
            raise
        return JSONResponse(self._response(call, finals))

    async def _next(self, call: "Call") -> tuple[int, RequestOutput] | None:
        try:
            async with asyncio.timeout_at(call.deadline):
                item = await anext(call.merged, None)
        except TimeoutError:
            raise RequestTimeout(f"the request did not finish within {self.request_timeout:g} s "
                                 f"(the server's --request-timeout)") from None
        if item is not None:
            call.clocks[item[0]].on_output(item[1])
        return item

    async def _collect(self, call: "Call") -> list[RequestOutput]:
        finals: list[RequestOutput | None] = [None] * len(call.prompts)
        while (item := await self._next(call)) is not None:
            if item[1].finished:
                finals[item[0]] = item[1]
        if any(f is None for f in finals):
            raise RequestFailed("the engine ended the request without a final output")
        return finals  # type: ignore[return-value]

    async def _events(self, call: "Call", first: tuple[int, RequestOutput]) -> AsyncGenerator[str, None]:
        n = call.body.n
        writer = ChunkWriter(call.kind, call.response_id, self.model_name, self.texts, call.body.include_usage)
        tracker = DeltaTracker()
        num_generated = [0] * len(call.prompts)
        finished = [False] * len(call.prompts)
        try:
            if call.kind == "chat":
                yield writer.roles(list(range(n)))
            item: tuple[int, RequestOutput] | None = first
            while item is not None:
                i, out = item
                deltas = [d for c in out.outputs
                          if (d := tracker.delta(i * n + c.index, visible_logprobs(c, self.texts))) is not None
                          and (d.text or d.logprobs or d.finish_reason)]  # token ids alone are not sent
                if deltas:
                    yield writer.deltas(deltas)
                if _failed(out):
                    yield error_event(f"the engine failed this request: {out.error or 'unknown error'}")
                    break
                if out.finished:
                    finished[i] = True
                    num_generated[i] = sum(len(c.token_ids) for c in out.outputs)
                item = await self._next(call)
            else:
                if call.body.include_usage:
                    yield writer.usage(call.num_prompt_tokens, sum(num_generated))
        except RequestTimeout as e:
            yield error_event(str(e), "timeout_error", "request_timeout")
        except FerryError as e:  # e.g. the 2nd prompt of a batch refused as overloaded after the 1st streamed
            yield f"data: {bytes(error_response(e).body).decode('utf-8')}\n\n"
        except Exception as e:  # a bug while serving this stream ends this stream only
            log.exception("error while streaming %s", call.response_id)
            yield error_event(f"internal error: {type(e).__name__}: {e}")
        finally:
            self.metrics.count_aborts(finished.count(False) * call.body.n)
            await call.merged.aclose()
        yield DONE

    def _response(self, call: "Call", finals: list[RequestOutput]) -> dict[str, Any]:
        chat = call.kind == "chat"
        choices: list[dict[str, Any]] = []
        num_generated = 0
        for i, out in enumerate(finals):
            if _failed(out):
                raise RequestFailed(out.error or "unknown error")
            for c in out.outputs:
                num_generated += len(c.token_ids)
                c = visible_logprobs(c, self.texts)
                choice: dict[str, Any] = {"index": i * call.body.n + c.index}
                if chat:
                    choice["message"] = {"role": "assistant", "content": c.text}
                    choice["logprobs"] = chat_logprobs(c.logprobs, self.texts) if c.logprobs is not None else None
                else:
                    choice["text"] = c.text
                    choice["logprobs"] = completion_logprobs(c.logprobs, self.texts) if c.logprobs is not None else None
                choice["finish_reason"] = c.finish_reason
                choice["stop_reason"] = c.stop_reason
                choices.append(choice)
        return {"id": call.response_id, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name, "choices": choices,
                "usage": usage(call.num_prompt_tokens, num_generated)}


@dataclass
class Call:
    """One API request on its way through the engine (one engine request per prompt)."""

    kind: str  # "chat" | "completion"
    response_id: str
    body: CompletionRequest | ChatCompletionRequest
    prompts: list[list[int]]  # token ids per prompt
    merged: Merged  # the prompts' engine streams, merged; closing it aborts them
    clocks: list[RequestClock]  # per prompt, for the latency histograms
    deadline: float  # loop time after which the request is aborted (--request-timeout)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def _failed(out: RequestOutput) -> bool:
    return bool(out.error) or any(c.finish_reason == "error" for c in out.outputs)
