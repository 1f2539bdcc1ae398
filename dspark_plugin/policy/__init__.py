"""Engine-free decisions around a step: how many drafts to verify, whether to draft, the step-rate curve."""
