"""TTT-Linear and TTT-MLP (Sun et al. 2024, "Learning to (Learn at Test Time)").

``NeuralMemory(ttt=True)``: ``nlx.ops.titans_memory`` without momentum or decay, on TTT's inner
model ``nlx.memory.deep.TTTMemory`` (``x + LN(x W + b)``, or ``x + LN(gelu(x W1 + b1) W2 + b2)``;
the per-head LayerNorm learned by the outer loop only, W and b written by the inner loop), with
TTT's learning-rate schedule inside each chunk of ``memory_chunk_size`` tokens (TTT's mini-batch,
16): gradients at the chunk-start weights (the dual form), token i of a chunk reading the
start weights minus ``c_i`` times the chunk's gradient steps so far, ``c_i = max(1/(i+1) +
offset_i, 0)`` with a learned offset. Inner rate ``ttt_base_lr · sigmoid(x W_lr) / head_dim``.
Both follow the TTT paper's code (ttt-lm-jax / ttt-lm-pytorch, ``ttt.py``).
"""

from __future__ import annotations

from flax import nnx

from nlx.nn.config import ModelConfig
from nlx.nn.neural_memory import NeuralMemory
from nlx.nn.registry import register


def ttt_linear(cfg: ModelConfig, *, rngs: nnx.Rngs) -> NeuralMemory:
  return NeuralMemory(cfg, rngs=rngs, memory="linear", lr_max=cfg.ttt_base_lr / cfg.dk, ttt=True)


def ttt_mlp(cfg: ModelConfig, *, rngs: nnx.Rngs) -> NeuralMemory:
  return NeuralMemory(cfg, rngs=rngs, memory="mlp", activation="gelu",
                      lr_max=cfg.ttt_base_lr / cfg.dk, ttt=True)


register("ttt_linear", ttt_linear,
         description="TTT-Linear: x + LN(xW + b), chunked GD with the 1/i schedule")
register("ttt_mlp", ttt_mlp,
         description="TTT-MLP: x + LN(gelu(xW1 + b1)W2 + b2), chunked GD with the 1/i schedule")
