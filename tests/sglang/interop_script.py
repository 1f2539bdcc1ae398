"""Run by tests/sglang/test_sglang_interop.py in a fresh SGLang process: load drafters written by this
project into SGLang 0.5.23's own `DSparkDraftModel` on CPU and compare, on the same inputs, what
SGLang computes with what the core computes. Prints one JSON object (head type -> findings).

Usage: python interop_script.py DRAFTER_DIR [DRAFTER_DIR ...] (each beside a `target/` HF dir).

What is SGLang's and what is not. SGLang's classes are instantiated as its model loader would
(`DSparkDraftModel(hf_config)`, then `load_weights` with the checkpoint's tensors); every number
compared comes from SGLang's modules: placement of each tensor, `project_target_hidden`, the
per-layer context K/V as `write_target_hidden_kv` computes it (`kv_proj_only`, `apply_k_norm`,
`apply_k_rope`), the block forward (`DSparkDraftModel.forward`: fused QKV, q/k norms, RoPE, o_proj,
fused residual norms, MLP, final norm), `markov_head.step_bias` step by step, and
`confidence_head.predict` with an STS table read by SGLang's own `load_sts_calibration_from_path`
from the drafter's `dspark_calibration.json`. Two things stand in for the engine: the attention
*backend* (RadixAttention reads K/V from the paged pool through a `ForwardBatch`; here a module
attends, non-causally, over [context K/V computed by SGLang's own projections; the block's K/V],
which is what the pool holds at that point) and the target's LM head (a plain matmul with the
target's weight, shared by both sides, as SGLang's `project_through_lm_head` does for an
unquantized head). The greedy step is `argmax(base + bias)` as in SGLang's `MarkovSampleStep`
with temperature 0.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("SGLANG_RAGGED_VERIFY_MODE", "cap-accept")   # static mode builds no confidence head

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from dspark_plugin.sglang.patches import cpu_rotary_native  # noqa: E402


def sglang_runtime(target_dir: Path) -> None:
    """What an SGLang scheduler process does before it builds models: publish the server arguments
    (the CPU flags `dspark-sglang` passes), then build the (single-rank, gloo) process groups."""
    import socket

    from sglang.srt.distributed.parallel_state import init_distributed_environment, initialize_model_parallel
    from sglang.srt.runtime_context import SpawnRanks, publish
    from sglang.srt.server_args import ServerArgs

    args = ServerArgs(model_path=str(target_dir), device="cpu", attention_backend="torch_native",
                      sampling_backend="pytorch", disable_cuda_graph=True, dtype="float32")
    publish(args, role="scheduler", ranks=SpawnRanks(world_rank=0, dp_rank=None, gpu_id=0))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method=f"tcp://127.0.0.1:{port}")
    initialize_model_parallel()


def sglang_draft_model(drafter_dir: Path):
    from sglang.srt.models.dspark import DSparkDraftModel
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(drafter_dir)
    model = DSparkDraftModel(config)
    model = model.float().eval()
    model.load_weights(iter(load_file(str(drafter_dir / "model.safetensors")).items()))
    return model


def placement(model, saved: dict[str, torch.Tensor]) -> tuple[int, list[str]]:
    """Every saved tensor must sit, bit-exact, in an SGLang parameter (q/k/v and gate/up fused)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    checked, problems = 0, []
    fused = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
             "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    for name, tensor in saved.items():
        parts = name.split(".")
        if len(parts) > 3 and parts[0] == "layers" and parts[-2] in fused and parts[2] in ("self_attn", "mlp"):
            target, index = fused[parts[-2]]
            pname = ".".join(parts[:-2] + [target, parts[-1]])
            if pname not in params:
                problems.append(f"{name}: no fused parameter {pname}")
                continue
            sizes = ([model.layers[0].self_attn.q_size, model.layers[0].self_attn.kv_size,
                      model.layers[0].self_attn.kv_size] if target == "qkv_proj" else [tensor.shape[0]] * 2)
            got = params[pname].split(sizes, dim=0)[index]
        elif name in params:
            got = params[name]
        else:
            problems.append(f"{name}: not placed (SGLang's loader skips it silently)")
            continue
        checked += 1
        if tuple(got.shape) != tuple(tensor.shape) or not torch.equal(got.float(), tensor.float()):
            problems.append(f"{name}: value differs after loading")
    loaded_names = set()
    for name in saved:
        parts = name.split(".")
        if len(parts) > 3 and parts[-2] in fused:
            loaded_names.add(".".join(parts[:-2] + [fused[parts[-2]][0], parts[-1]]))
        else:
            loaded_names.add(name)
    never = sorted(n for n in params if n not in loaded_names)
    problems += [f"{n}: SGLang parameter not in the checkpoint (left at its initial value)" for n in never]
    return checked, problems


class PoolAttention(torch.nn.Module):
    """Stand-in for the attention backend: non-causal attention of the block's queries over the context
    K/V (as SGLang's own projections wrote them into the pool) followed by the block's K/V."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scaling: float,
                 ctx_k: torch.Tensor, ctx_v: torch.Tensor):
        super().__init__()
        self.h, self.hkv, self.dh, self.scaling = num_heads, num_kv_heads, head_dim, scaling
        self.ctx_k, self.ctx_v = ctx_k, ctx_v   # [Lc, Hkv*Dh]
        self.calls = 0

    def forward(self, q, k, v, forward_batch=None, **kw):
        self.calls += 1
        n = q.shape[0]
        heads = lambda x, h: x.reshape(-1, h, self.dh).transpose(0, 1)[None]   # noqa: E731
        keys = torch.cat([self.ctx_k, k.reshape(n, -1)], 0)
        values = torch.cat([self.ctx_v, v.reshape(n, -1)], 0)
        out = F.scaled_dot_product_attention(heads(q, self.h), heads(keys, self.hkv), heads(values, self.hkv),
                                             scale=self.scaling, enable_gqa=self.h != self.hkv)
        return out[0].transpose(0, 1).reshape(n, self.h * self.dh)


def compare(drafter_dir: Path) -> dict:
    from sglang.srt.speculative.dspark_components.dspark_sts import load_sts_calibration_from_path
    from transformers import AutoModelForCausalLM

    from dspark_plugin.checkpoint.deepspec import load_drafter
    from dspark_plugin.decode.draft import sequential_draft
    from dspark_plugin.model.drafter import ContextCache

    target = AutoModelForCausalLM.from_pretrained(drafter_dir.parent / "target", dtype=torch.float32).eval()
    ours = load_drafter(drafter_dir, target=target)
    saved = load_file(str(drafter_dir / "model.safetensors"))
    model = sglang_draft_model(drafter_dir)
    out: dict = {"markov": type(model.markov_head).__name__,
                 "confidence": type(model.confidence_head).__name__ if model.confidence_head is not None else None}
    out["checked"], out["problems"] = placement(model, saved)

    cfg = ours.cfg
    gen = torch.Generator().manual_seed(7)
    ctx_len, batch = 9, 1
    taps = torch.randn(batch, ctx_len, cfg.num_taps * cfg.tapped_hidden_size, generator=gen)
    ctx_pos = torch.arange(ctx_len)[None]
    anchor = torch.tensor([5])
    n = cfg.block_size
    block_pos = torch.arange(ctx_len, ctx_len + n)
    embed, lm_head = target.get_input_embeddings(), target.get_output_embeddings()
    diffs: dict[str, float] = {}

    with torch.no_grad():
        # Context features and the K/V SGLang writes into the draft pool (write_target_hidden_kv's per-layer path).
        ctx_sgl = model.project_target_hidden(taps[0])
        diffs["context_features"] = (ctx_sgl - ours.backbone.context_features(taps)[0]).abs().max().item()
        ours_kv = ours.context_kv(taps, ctx_pos)
        worst_k = worst_v = 0.0
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            k, v = attn.kv_proj_only(ctx_sgl)
            k = attn.apply_k_rope(ctx_pos[0], attn.apply_k_norm(k))
            ok_, ov_ = (t[0].transpose(0, 1).reshape(ctx_len, -1) for t in ours_kv[i])
            worst_k = max(worst_k, (k - ok_).abs().max().item())
            worst_v = max(worst_v, (v - ov_).abs().max().item())
            attn.attn = PoolAttention(attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scaling, k, v)
        diffs["context_k"], diffs["context_v"] = worst_k, worst_v

        # The block forward: [anchor, mask, ...] at positions ctx_len .. ctx_len + n - 1.
        tokens = torch.full((n,), cfg.mask_token_id, dtype=torch.long)
        tokens[0] = anchor[0]
        h_sgl = model.forward(tokens, block_pos, None, input_embeds=embed(tokens)).hidden_states
        cache = ContextCache(batch)
        cache.append(ours_kv, torch.tensor([ctx_len]))
        h_ours = ours.block_hidden(cache, anchor, torch.tensor([ctx_len]))[0]
        g = h_ours.shape[0]
        h_sgl = h_sgl[n - g:]
        diffs["block_hidden"] = (h_sgl - h_ours).abs().max().item()
        out["attention_calls"] = [layer.self_attn.attn.calls for layer in model.layers]

        # Sequential head and confidence on the same hidden states (ours), greedy.
        h = h_ours[None]
        block = sequential_draft(ours, h, anchor)
        base = lm_head(h).float()
        state = model.markov_head.init_state(h)
        prev, sgl_tokens, worst_bias = anchor.long(), [], 0.0
        our_state = ours.markov_head.init_state(h[:, 0])
        our_prev = anchor.long()
        for k in range(g):
            bias, state = model.markov_head.step_bias(prev, hidden_states=h[:, k], state=state)
            our_bias, our_state, _ = ours.markov_head.step(our_prev, h[:, k], our_state)
            worst_bias = max(worst_bias, (bias - our_bias).abs().max().item())
            prev = (base[:, k] + bias.float()).argmax(-1)
            our_prev = block.tokens[:, k]
            sgl_tokens.append(prev)
        diffs["markov_bias"] = worst_bias
        out["tokens_sglang"] = torch.stack(sgl_tokens, 1)[0].tolist()
        out["tokens_core"] = block.tokens[0].tolist()

        if model.confidence_head is not None and block.confidence is not None:
            calibration = drafter_dir / "dspark_calibration.json"
            if calibration.is_file():
                table = load_sts_calibration_from_path(str(calibration))
                model.confidence_head.sts_temperatures = torch.tensor(table.temperatures, dtype=torch.float32)
            conf, _raw = model.confidence_head.predict(h.reshape(g, -1), anchor_tokens=anchor,
                                                       draft_tokens=block.tokens, markov_head=model.markov_head)
            diffs["confidence"] = (conf - block.confidence).abs().max().item()
            out["calibrated"] = calibration.is_file()
    out["max_abs_diff"] = diffs
    return out


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    if cpu_rotary_native.applies():   # the plugin's own patch: RoPE off vLLM's custom op on a CPU host
        cpu_rotary_native.install()
    sglang_runtime(Path(argv[0]).parent / "target")
    results = {}
    for arg in argv:
        path = Path(arg)
        try:
            results[path.name] = compare(path)
        except Exception as e:  # noqa: BLE001 - a refusal to load is a finding, reported per drafter
            results[path.name] = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
