"""Model conversions.

* ``level_stacking``: a Hope-attention model from a Transformer++ (its MLPs become CMS levels;
  the paper's §7.3), ``transformer_to_hope_attention``.
* ``llama``: Hugging Face-format Llama-architecture weights (``config.json`` + ``*.safetensors``;
  Llama, TinyLlama, SmolLM) as an nlx Transformer++ (``load_llama``, ``convert_llama``; the
  command ``nlx convert llama HF_DIR OUT_WORKDIR``).
"""

from nlx.convert.level_stacking import transformer_to_hope_attention

__all__ = ["transformer_to_hope_attention"]
