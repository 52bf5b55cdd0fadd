"""ferry: LLM inference and serving for machines smaller than the model."""
from ferry.request import CompletionOutput, RequestOutput, SamplingParams

__all__ = ["LLM", "AsyncLLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):  # the engine pulls in torch; import it only when asked for
    if name == "LLM":
        from ferry.engine.llm import LLM
        return LLM
    if name == "AsyncLLM":
        from ferry.engine.async_engine import AsyncLLM
        return AsyncLLM
    raise AttributeError(name)
