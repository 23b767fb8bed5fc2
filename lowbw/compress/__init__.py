"""Codecs for what crosses stage boundaries; importing this package registers the built-in ones.

Built-in: ``none`` (base), ``fp16``/``bf16`` (cast), ``quant``/``int8``/``int4``/``int2`` (quantize),
``topk``/``randk`` (sparsify), ``powersgd`` (lowrank), ``aqsgd`` (delta). See ``docs/compression.md``.
"""

from lowbw.compress import cast, delta, lowrank, quantize, sparsify  # noqa: F401  (register codecs)
from lowbw.compress.base import CODECS, Codec, build_codec, register_codec

__all__ = ["CODECS", "Codec", "build_codec", "register_codec"]
