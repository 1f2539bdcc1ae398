"""The engine-free reference runners over a Hugging Face target (the tests' correctness oracle)."""
