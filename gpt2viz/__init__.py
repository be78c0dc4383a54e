"""gpt2viz: a faithful, hookable GPT-2 and the tools to watch it generate."""

from .hooks import ActivationCache, HookPoint
from .loading import (
    CheckpointError,
    HubUnavailableError,
    available_models,
    load_model,
    save_checkpoint,
)
from .model import GPT2, ConfigError, ContextLengthError, GPT2Config, KVCache
from .generation import Candidate, GenerationSession, Step, decode_complete, generate
from .sampling import SamplingConfig
from .trace import Trace, TraceBudgetError, trace
from .tokenizer import TokenizerFileError, encode, load_tokenizer, token_strings

__all__ = [
    "ActivationCache", "HookPoint", "CheckpointError", "HubUnavailableError", "available_models",
    "load_model", "save_checkpoint", "GPT2", "ConfigError", "ContextLengthError", "GPT2Config",
    "KVCache", "TokenizerFileError", "encode", "load_tokenizer", "token_strings", "Candidate",
    "GenerationSession", "Step", "decode_complete", "generate", "SamplingConfig", "Trace", "TraceBudgetError", "trace",
]
