"""The drafter as torch modules: decoder layers, KV-injection backbone, sequential and confidence heads."""
