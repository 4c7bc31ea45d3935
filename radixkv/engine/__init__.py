"""The engine layer: requests, scheduling, sampling, the model runner, the step and its loop."""

from radixkv.engine.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from radixkv.engine.engine import Engine, EngineConfig
from radixkv.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from radixkv.engine.request import Request, Status
from radixkv.engine.sampling_params import SamplingParams

__all__ = ["BeamSearchOutput", "BeamSearchParams", "BeamSearchSequence",
           "CompletionOutput", "Engine", "EngineConfig", "Request", "RequestMetrics",
           "RequestOutput", "SamplingParams", "Status"]
