"""nlx.nn: Flax NNX modules of the model zoo, one file per family, all on ``nlx.ops``.

``build_model(config.model, rngs=...)`` returns the ``LM`` of ``config.model.family``; the
registered families are ``nlx.nn.registry.names()``.
"""

from nlx.nn import families, registry
from nlx.nn.config import ModelConfig
from nlx.nn.model import LM, build_model

__all__ = ["build_model", "LM", "ModelConfig", "registry", "families"]
