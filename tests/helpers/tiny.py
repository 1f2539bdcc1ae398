"""Tiny real models the tests build themselves: an HF Llama/Qwen3 target and DSpark drafters."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from dspark_plugin.config.drafter_config import DSparkConfig
from dspark_plugin.decode.taps import tap_layer_ids
from dspark_plugin.model.drafter import DSparkDrafter

VOCAB = 96
HIDDEN = 32


def tiny_target(kind: str = "llama", seed: int = 0, vocab: int = VOCAB, layers: int = 6,
                dtype: torch.dtype = torch.float32, init: float = 0.3) -> torch.nn.Module:
    """init 0.3 gives varied greedy text (drafts get rejected); 0.02 gives repetitive text
    (long accepted runs), so together they exercise every acceptance length."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=0, eos_token_id=1, pad_token_id=0, initializer_range=init)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=8, tie_word_embeddings=False))
    # Sharper logits than the default init, so greedy decoding has no near-ties.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)
    return model.to(dtype).eval()


def tiny_drafter_config(target, head: str = "vanilla", block_size: int = 7, rank: int = 16,
                        confidence: bool = True, layers: int = 1) -> DSparkConfig:
    tc = target.config
    dflash = head == "none"
    return DSparkConfig.from_dict(dict(
        hidden_size=tc.hidden_size, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=tc.vocab_size,
        rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=512,
        block_size=block_size, mask_token_id=tc.vocab_size - 1,
        target_layer_ids=tap_layer_ids(tc.num_hidden_layers, 3), num_target_layers=tc.num_hidden_layers,
        markov_rank=0 if dflash else rank, markov_head_type="vanilla" if dflash else head,
        enable_confidence_head=not dflash and confidence,
    ), source="<tiny>")


def tiny_drafter(target, head: str = "vanilla", seed: int = 1, **kw) -> DSparkDrafter:
    torch.manual_seed(seed)
    drafter = DSparkDrafter(tiny_drafter_config(target, head, **kw))
    drafter.attach_target(target.get_input_embeddings(), target.get_output_embeddings())
    return drafter.to(next(target.parameters()).dtype).eval()


CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant {% endif %}")


def tiny_tokenizer(vocab: int = VOCAB, chat: bool = True):
    """A real word-level tokenizer: `<pad>`=0, `</s>`=1 (EOS), `<unk>`=2, `<s>`=3, then words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", "<s>", "user", "assistant"]
    words += [f"w{i}" for i in range(len(words), vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   bos_token="<s>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_target(path, **kw):
    """A target directory as `dspark` commands expect it: safetensors weights + tokenizer."""
    model = tiny_target(**kw)
    model.save_pretrained(path)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(path)
    return model
