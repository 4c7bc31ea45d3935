"""The engine layer: requests, scheduling, the model runner and the step loop."""

from radixkv.engine.engine import Engine, EngineConfig
from radixkv.engine.request import Request, Status
from radixkv.engine.sampling_params import SamplingParams

__all__ = ["Engine", "EngineConfig", "Request", "SamplingParams", "Status"]
