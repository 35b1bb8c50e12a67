"""exaserve engine: everything between token ids in and token ids out."""
from exaserve.engine.async_engine import AsyncEngine
from exaserve.engine.llm import LLM
from exaserve.engine.outputs import CompletionOutput, DeltaOutput, RequestOutput
from exaserve.engine.sampling_params import SamplingParams

__all__ = ["AsyncEngine", "LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "DeltaOutput"]
