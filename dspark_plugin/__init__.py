"""DSpark semi-parallel speculative decoding: engine-free core plus vLLM / SGLang adapters."""
__version__ = "0.1.0"
