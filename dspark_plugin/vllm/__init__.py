"""vLLM adapter: registration, V1 DSpark proposer, version policy."""
