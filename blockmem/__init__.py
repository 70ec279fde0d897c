"""blockmem: long-context LLM inference with a block-structured context memory.

    import blockmem
    model = blockmem.load()                    # the packaged default, SmolLM2-135M-Instruct
    engine = blockmem.Engine(model)
    print(engine.generate("What is the capital of France?").text)
"""

from blockmem.attention import create_method
from blockmem.engine import Completion, Engine, SamplingParams, Stats, Stream
from blockmem.errors import BlockmemError, ConfigError, ContextLengthError, ModelError
from blockmem.model.loader import Model, load

__version__ = "0.1.0"

__all__ = ["BlockmemError", "Completion", "ConfigError", "ContextLengthError", "Engine", "Model", "ModelError",
           "SamplingParams", "Stats", "Stream", "create_method", "load"]
