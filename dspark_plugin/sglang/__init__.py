"""SGLang adapter."""
