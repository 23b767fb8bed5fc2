"""Codecs for what crosses stage boundaries; importing this package registers the built-in ones."""

from lowbw.compress.base import CODECS, Codec, build_codec, register_codec

__all__ = ["CODECS", "Codec", "build_codec", "register_codec"]
