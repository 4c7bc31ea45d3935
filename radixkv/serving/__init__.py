"""The serving layer: the library APIs (`LLM`, `AsyncLLM`) and the OpenAI-compatible server."""
