"""The serving layer: `LLM` (threads), `AsyncLLM` (asyncio), and the server on top of them."""

from radixkv.serving.async_llm import AsyncLLM
from radixkv.serving.llm import LLM

__all__ = ["AsyncLLM", "LLM"]
