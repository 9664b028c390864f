"""Delta gradient descent (DGD): HOPE's inner optimizer, ``titans_memory`` plus a decay term.

``dgd_memory`` adds to every layer's write the decay term ``−lr_t h_lᵀ (h_l W_l)`` on the layer's
input (docs/EQUATIONS.md, Eqs. 88–93). Its three forms (``impl``):

* reference, token by token: ``nlx/memory/recurrent.py::recurrent_scan`` with ``dgd=True`` and
  ``grad_chunk=chunk_size`` (``impl="recurrent"``);
* chunked: the chunk-start dual form ``nlx/memory/chunk_start.py::chunk_start_scan`` with
  ``dgd=True``, whose ``_dgd_writes`` solves each layer's decay terms of a chunk as a unit lower
  triangular system (``nlx/memory/chunks.py::unit_lower_solve``, the UT transform of the delta
  rule); ``chunk_start_scan_offset`` continues a chunk in progress;
* kernel: the delta rule's (``pallas_kernels/chunked_memory``, kind ``"delta_rule"``, through
  ``nlx.ops.delta_rule``), for the case that is the gated delta rule: ``objective="dot"``, a
  linear memory, no momentum, read after the write, chunks aligned with the call.

Validation, layout and the ``TitansState`` are ``titans_memory``'s
(``nlx.ops.titans.gradient_memory``).
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp

from nlx.memory import core
from nlx.memory.objectives import DOT, L2
from nlx.ops.delta_rule import delta_rule
from nlx.ops.titans import TitansState, gradient_memory
from nlx.ops.validation import check_objective

Array = jax.Array


def dgd_memory(q: Array, k: Array, v: Array, *, lr: Array, g: Optional[Array] = None,
               momentum: Optional[Array] = None, memory: Union[str, core.Memory] = "linear",
               objective: str = "l2", initial_state=None, chunk_size: int = 64,
               read: str = "after_write", impl: str = "auto", reset: Optional[Array] = None,
               reset_state=None, proximal: bool = False) -> tuple[Array, TitansState]:
  """Delta gradient descent (DGD): ``titans_memory`` plus a decay term on every layer's input.

  HOPE's inner optimizer (docs/EQUATIONS.md, Eqs. 56–57 and 88–93). Per head, with row-vector
  layers ``y = h W`` (linear memory: ``M(x) = x S``, ``S`` ``[K, V]``; MLP: ``M(x) = x +
  σ(x W2) W1``): for token t of a chunk (chunks aligned with the sequence start) whose start state
  is ``W_c``, let ``h_l`` be layer l's input and ``e_l`` the gradient of the objective (``½‖M(k_t) −
  v_t‖²`` for "l2", ``−⟨M(k_t), v_t⟩`` for "dot") with respect to layer l's output, both with M at
  ``W_c``. Then::

      P_l ← m_t P_l − lr_t h_lᵀ e_l                         (no momentum: P_l = −lr_t h_lᵀ e_l)
      W_l ← (exp(g_t) I − lr_t h_lᵀ h_l) W_l + P_l          (the decay touches only W_l)
      o_t = M_W(q_t)     after the write ("after_write") or before it ("before_write")

  With ``proximal=True`` every ``lr_t`` above becomes the layer's own rate ``lr_t / (1 + lr_t
  ‖h_l‖²)``, on both terms: the exact step of DGD's proximal objective (Eqs. 56–57) for an input
  of any norm, ``η/(1 + η)`` for a unit-norm one (the arXiv rate). Without it a layer whose input
  is not normalised (an MLP's hidden layer) decays by ``α − lr ‖h_l‖²`` along ``h_l``, which
  diverges once ``lr ‖h_l‖² > 1 + α``; with it the factor is ``α − lr ‖h_l‖²/(1 + lr ‖h_l‖²)``,
  in ``(α − 1, α]`` (docs/EQUATIONS.md, choice 1).

  ``chunk_size=1`` is Eq. 88 token by token; per chunk, the decay term acts on the running state
  and only the gradient term on ``W_c`` (Eq. 93). The chunked form solves each layer's decay terms
  of a chunk as a unit lower triangular system (the UT transform of ``delta_rule``) and equals
  the recurrence for every chunk size. ``objective="dot"`` on a linear memory without momentum is
  the gated delta rule: ``delta_rule(q, k, exp(g)·v, beta=lr/exp(g), g=g, scale=1)``.

  Args:
    q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; lr: ``[B, T, H]`` the rate of both terms;
    g: ``[B, T, H]`` log-retention (≤ 0; ``exp(g) = α``) or None; momentum: ``[B, T, H]`` or None.
    memory, initial_state, chunk_size, read, reset, reset_state: as in ``titans_memory`` (the
      same state and continuation contract: a sequence split anywhere across calls equals one
      call; with ``reset``, each document of a packed row equals the document alone).
    objective: "l2" (Eq. 88) or "dot" (Eq. 92).
    impl: "auto" | "chunked" | "recurrent" | "pallas" (the ``delta_rule`` kernels; only for the
      gated-delta-rule case above, read after the write, chunks aligned with the call; with
      ``reset``, ``reset_state`` None, since the kernels restart from zero).
    proximal: each layer's rate ``lr_t / (1 + lr_t ‖h_l‖²)`` (see above); a bool.

  Returns:
    ``(o [B, T, H, V], TitansState)``.
  """
  check_objective(objective)
  if not isinstance(proximal, bool):
    raise TypeError(f"proximal={proximal!r}: allowed: True or False")
  return gradient_memory(q, k, v, lr, momentum, g, memory, L2 if objective == "l2" else DOT,
                         initial_state, chunk_size, read, impl,
                         dgd="proximal" if proximal else True,
                         kernel=functools.partial(_dgd_pallas, proximal=proximal),
                         reset=reset, reset_state=reset_state,
                         packed_kernel=functools.partial(_dgd_pallas_packed, proximal=proximal))


def _dgd_pallas(q, k, v, lr, momentum, g, state, offset, chunk_size, proximal=False):
  """``dgd_memory`` on the delta rule's kernels: ``delta_rule(q, k, exp(g)·v, beta=lr/exp(g),
  g=g, scale=1)``, for the gated-delta-rule case only (no momentum: ``gradient_memory`` sends
  nothing else here), starting at a chunk boundary. A linear memory's one layer has the input
  k, so ``proximal`` is the rate ``lr / (1 + lr ‖k‖²)`` given to the kernels."""
  del momentum
  if offset is not None:
    raise ValueError("impl='pallas': dgd_memory on the kernels starts at a chunk boundary; "
                     "use impl='chunked' to continue a chunk in progress")
  weights = state.memory if isinstance(state, TitansState) else state
  o, s = _gated_delta_rule(q, k, v, lr, g, weights, chunk_size, proximal)
  return o, TitansState(s, None, s, 0)


def _gated_delta_rule(q, k, v, lr, g, weights, chunk_size, proximal, reset=None):
  if proximal:
    norm = jnp.sum(jnp.square(k.astype(lr.dtype)), axis=-1)
    lr = lr / (1.0 + lr * norm)
  alpha = jnp.ones_like(lr) if g is None else jnp.exp(g.astype(lr.dtype))
  return delta_rule(q, k, (alpha[..., None] * v).astype(v.dtype), beta=lr / alpha, g=g,
                    scale=1.0, initial_state=weights, chunk_size=chunk_size, impl="pallas",
                    reset=reset)


def _dgd_pallas_packed(q, k, v, lr, momentum, g, weights, mom, reset, reset_state, chunk_size,
                       proximal=False):
  """``dgd_memory`` with ``reset`` on the delta rule's kernels (the gated-delta-rule case, a call
  that starts a chunk, ``reset_state`` None: the kernels restart from zero). The objective's
  gradient ``−v kᵀ`` does not read the memory, so no gradient chunk enters the outputs: the
  returned ``chunk_start`` is the final memory and ``offset`` each row's position in its last
  document's chunk, which a continuing call needs for nothing but the contract."""
  del momentum, mom, reset_state
  reset = jnp.asarray(reset).astype(bool)
  o, s = _gated_delta_rule(q, k, v, lr, g, weights, chunk_size, proximal, reset)
  positions = core.batched(lambda r: core.chunk_positions(r, 0, chunk_size), 1)(reset)
  return o, TitansState(s, None, s, ((positions[:, -1] + 1) % chunk_size).astype(jnp.int32))
