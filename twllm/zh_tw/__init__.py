"""Traditional Chinese (Taiwan) output: Simplified → Taiwan Traditional normalisation, its terms, the eval."""

from twllm.zh_tw.mainland import mainland_terms
from twllm.zh_tw.normalize import SEGMENT_CAP, StreamNormalizer, is_simplified, normalize

__all__ = ["SEGMENT_CAP", "StreamNormalizer", "is_simplified", "mainland_terms", "normalize"]
