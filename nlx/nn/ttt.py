"""TTT-Linear and TTT-MLP: test-time training of a linear or MLP memory by chunked gradient descent.

``NeuralMemory`` without momentum or decay (``nlx.ops.titans_memory`` with a linear memory or
``MLPMemory("gelu")``): inside each chunk of ``memory_chunk_size`` tokens (TTT's mini-batch, 16)
the gradients are taken at the chunk-start weights, the TTT dual form.
"""

from __future__ import annotations

from flax import nnx

from nlx.nn.config import ModelConfig
from nlx.nn.neural_memory import NeuralMemory
from nlx.nn.registry import register


def ttt_linear(cfg: ModelConfig, *, rngs: nnx.Rngs) -> NeuralMemory:
  return NeuralMemory(cfg, rngs=rngs, memory="linear", lr_max=cfg.ttt_base_lr / cfg.dk)


def ttt_mlp(cfg: ModelConfig, *, rngs: nnx.Rngs) -> NeuralMemory:
  return NeuralMemory(cfg, rngs=rngs, memory="mlp", activation="gelu",
                      lr_max=cfg.ttt_base_lr / cfg.dk)


register("ttt_linear", ttt_linear, description="TTT-Linear: chunked GD on a linear memory")
register("ttt_mlp", ttt_mlp, description="TTT-MLP: chunked GD on a residual MLP memory")
