"""exaserve engine: everything between token ids in and token ids out."""
from engine.async_engine import AsyncEngine
from engine.llm import LLM
from engine.outputs import CompletionOutput, DeltaOutput, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["AsyncEngine", "LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "DeltaOutput"]
