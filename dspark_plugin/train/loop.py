"""The training loop: target features -> anchor blocks -> loss -> AdamW, resumable.

Everything random is derived from (seed, step) or (seed, epoch), so a run resumed from a
checkpoint draws the same batches and anchors as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from dspark_plugin.checkpoint.deepspec import save_drafter
from dspark_plugin.checkpoint.native_dflash import save_native
from dspark_plugin.config.drafter_config import DSparkConfig
from dspark_plugin.config.dtypes import DTYPES, SAVE_DTYPES
from dspark_plugin.decode.taps import tap_layer_ids
from dspark_plugin.errors import DSparkError
from dspark_plugin.model.drafter import DSparkDrafter
from dspark_plugin.train.blocks import build_batch
from dspark_plugin.train.cache import extend_cache, log_partition, open_or_create, target_features
from dspark_plugin.train.data import Sequence, read_sequences
from dspark_plugin.train.loss import drafter_loss
from dspark_plugin.train.prune_vocab import draft_lm_head, select_draft_vocab
from dspark_plugin.train.state import load_state, save_state

HEADS = ("vanilla", "gated", "rnn", "none")
# deepspec: this package's anchor-first drafter (config.json for `method: dspark`);
# dflash: vLLM's native `dflash` drafter (bonus token + masks, see dspark_plugin/config/dflash_native.py).
LAYOUTS = ("deepspec", "dflash")
LOG_NAME = "train_log.jsonl"


@dataclasses.dataclass
class TrainOptions:
    target: str
    data: str
    out: str
    head: str = "vanilla"
    layout: str = "deepspec"
    layers: int = 1
    num_taps: int = 5
    block_size: int = 7
    markov_rank: int = 64
    confidence: bool = True
    steps: int | None = None
    epochs: float | None = None
    lr: float = 6e-4
    warmup: float = 0.04
    weight_decay: float = 0.0
    batch_size: int = 4
    anchors_per_seq: int = 16
    max_len: int = 1024
    seed: int = 0
    resume: bool = False
    cache: str | None = None          # activation cache dir; None = <out>/act_cache
    no_cache: bool = False            # target forward inside the loop instead (large targets)
    cache_only: bool = False
    extend_cache: bool = True         # False: train on the sequences already cached (a separate builder fills it)
    cache_matmul: str | None = None   # cache build matmuls, "float32" / "bfloat16"; None keeps a cache's own
    save_every: int = 100
    stop_after: int | None = None     # pause (checkpoint and exit) after this step; --resume continues
    save_dtype: str = "bfloat16"
    mask_token_id: int | None = None
    threads: int | None = None
    progress: bool = True
    init: str = "target"              # "target": draft layers/norm start as copies of the target's last ones
    draft_vocab: int | None = None    # train inside a pruned draft vocabulary of this many tokens


def lr_at(step: int, total: int, base: float, warmup_frac: float) -> float:
    """Linear warm-up over the first `warmup_frac` of steps, then cosine decay to zero."""
    warm = max(1, int(round(warmup_frac * total)))
    if step < warm:
        return base * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def drafter_config(target_config, opts: TrainOptions, mask_token_id: int) -> DSparkConfig:
    """The target's decoder geometry + the DSpark fields (docs/algorithm.md §3)."""
    tc = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
    L = int(tc.num_hidden_layers)
    dflash = opts.head == "none"
    rope = getattr(tc, "rope_parameters", None) or {}
    raw = dict(
        model_type="qwen3",  # draft layers are Qwen3-shaped whatever the target family
        hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size, num_hidden_layers=opts.layers,
        num_attention_heads=tc.num_attention_heads,
        num_key_value_heads=getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads,
        head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads,
        rms_norm_eps=float(getattr(tc, "rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", getattr(tc, "rope_theta", 10000.0))),
        vocab_size=tc.vocab_size, max_position_embeddings=tc.max_position_embeddings, hidden_act="silu",
        bos_token_id=getattr(tc, "bos_token_id", None), eos_token_id=getattr(tc, "eos_token_id", None),
        block_size=opts.block_size, mask_token_id=mask_token_id,
        target_layer_ids=tap_layer_ids(L, opts.num_taps), num_target_layers=L,
        markov_rank=0 if dflash else opts.markov_rank,
        markov_head_type="vanilla" if dflash else opts.head,
        enable_confidence_head=(not dflash) and opts.confidence,
        confidence_head_with_markov=(not dflash) and opts.markov_rank > 0,
        # The native dflash block drafts from its masks only, each at the drafted token's position.
        sample_from_anchor=opts.layout != "dflash",
    )
    return DSparkConfig.from_dict({k: v for k, v in raw.items() if v is not None}, source=f"{opts.target} (derived)")


def init_drafter(cfg: DSparkConfig, seed: int) -> DSparkDrafter:
    torch.manual_seed(seed)
    drafter = DSparkDrafter(cfg)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if name.endswith("norm.weight"):
                continue
            if "markov_w2" in name:
                p.zero_()  # the Markov bias starts at 0: training starts from the plain backbone
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    return drafter


_LAYER_PARAMS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


def init_from_target(drafter: DSparkDrafter, target: torch.nn.Module) -> int:
    """Start draft layer i as a copy of target layer L - n + i and the final norm as the target's.

    The draft layers read the same residual stream geometry as the target's top layers, so a
    copy starts from a working language-model layer instead of noise (EAGLE-style init); only
    `fc`, `hidden_norm` and the heads start fresh. Weights whose shapes differ stay random.
    Returns the number of tensors copied.
    """
    base = getattr(target, "model", target)
    t_layers = getattr(base, "layers", None)
    if t_layers is None:
        return 0
    d_layers = drafter.backbone.layers
    offset = len(t_layers) - len(d_layers)
    copied = 0
    with torch.no_grad():
        for i, layer in enumerate(d_layers):
            src = t_layers[offset + i]
            for name in _LAYER_PARAMS:
                dst_p, src_p = _param(layer, name), _param(src, name)
                if dst_p is not None and src_p is not None and dst_p.shape == src_p.shape:
                    dst_p.copy_(src_p.to(dst_p.dtype))
                    copied += 1
        norm = getattr(base, "norm", None)
        if norm is not None and getattr(norm, "weight", None) is not None \
                and norm.weight.shape == drafter.backbone.norm.weight.shape:
            drafter.backbone.norm.weight.copy_(norm.weight.to(drafter.backbone.norm.weight.dtype))
            copied += 1
    return copied


def _param(module: torch.nn.Module, dotted: str) -> torch.Tensor | None:
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return getattr(module, "weight", None)


def _default_mask_token(target_dir: str, vocab_size: int) -> int:
    """A token that never occurs as text: the tokenizer's unk/endoftext if distinct from EOS/pad."""
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(target_dir)
        cand = tok.unk_token_id
        if cand is not None and cand not in (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id):
            return int(cand)
    except Exception:  # a target dir without tokenizer is still a valid target
        pass
    return vocab_size - 1


VOCAB_FILE = "draft_vocab.json"


def choose_draft_vocab(out: Path, seqs: list[Sequence], size: int, vocab_size: int,
                       keep: list[int]) -> torch.Tensor:
    """The draft vocabulary of a run: chosen once from the responses, reused on --resume.

    Kept in <out>/draft_vocab.json because more generated data may be appended between resumed
    runs, while the Markov W2 rows must keep their meaning.
    """
    from collections import Counter

    path = out / VOCAB_FILE
    if path.is_file():
        ids = json.loads(path.read_text())
        if not isinstance(ids, list) or len(ids) != size:
            raise DSparkError(f"{path}: holds {len(ids) if isinstance(ids, list) else 'no'} ids, "
                              f"--draft-vocab asks for {size}; use a new --out")
        return torch.tensor(ids, dtype=torch.long)
    counts: Counter = Counter()
    for s in seqs:
        counts.update(s.ids[s.prompt_len:])
    ids = select_draft_vocab(counts, size, vocab_size, keep=keep)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ids.tolist()) + "\n")
    return ids


def _acc_text(correct: torch.Tensor, count: torch.Tensor) -> str:
    acc = correct / count.clamp_min(1)
    return "/".join(f"{int(round(100 * float(x)))}" for x in acc)


def train(opts: TrainOptions) -> Path:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    if opts.head not in HEADS:
        raise DSparkError(f"--head must be one of {', '.join(HEADS)}, got {opts.head!r}")
    if opts.save_dtype not in SAVE_DTYPES:
        raise DSparkError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, got {opts.save_dtype!r}")
    if opts.head != "none" and opts.markov_rank < 1:
        raise DSparkError(f"--head {opts.head} needs --markov-rank >= 1 (use --head none for a DFlash-style drafter)")
    if opts.layout not in LAYOUTS:
        raise DSparkError(f"--layout must be one of {', '.join(LAYOUTS)}, got {opts.layout!r}")
    if opts.layout == "dflash" and opts.head != "none":
        raise DSparkError(f"--layout dflash writes vLLM's native dflash drafter, which has no sequential or "
                          f"confidence head: use --head none (got --head {opts.head})")
    if opts.layout == "dflash" and opts.block_size < 2:
        raise DSparkError(f"--layout dflash needs --block-size >= 2 (one bonus token + masks), got {opts.block_size}")
    if opts.layout == "dflash" and opts.draft_vocab is not None:
        raise DSparkError("--layout dflash writes vLLM's native dflash drafter, which scores the full vocabulary: "
                          "drop --draft-vocab")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    out = Path(opts.out)
    target_dir = str(opts.target)
    if not (Path(target_dir) / "config.json").is_file():
        raise DSparkError(f"{target_dir}: not a Hugging Face model directory (config.json missing); "
                          f"see `dspark prepare-target`")
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    target.requires_grad_(False)
    tc = target.config.get_text_config()
    mask_id = opts.mask_token_id if opts.mask_token_id is not None else _default_mask_token(target_dir, tc.vocab_size)
    cfg = drafter_config(target.config, opts, mask_id)
    if opts.draft_vocab is not None and not 0 < opts.draft_vocab <= tc.vocab_size:
        raise DSparkError(f"--draft-vocab must be between 1 and the target's vocab_size {tc.vocab_size}, "
                          f"got {opts.draft_vocab}")

    seqs = read_sequences(opts.data, max_len=opts.max_len)
    if not seqs:
        raise DSparkError(f"{opts.data}: no usable sequences (each needs a prompt and >= 2 response tokens)")
    cache = None
    if not opts.no_cache:
        cache = open_or_create(opts.cache or out / "act_cache", cfg.target_layer_ids, tc.hidden_size, target_dir,
                               matmul_dtype=opts.cache_matmul)
        if opts.extend_cache or opts.cache_only:
            extend_cache(cache, target, seqs, progress=opts.progress)
        if opts.cache_only:
            return Path(cache.path)
        cached = cache.lines
        seqs = [s for s in seqs if s.line in cached]
        if not seqs:
            raise DSparkError(f"{cache.path}: no sequence of {opts.data} is cached yet")

    if opts.init not in ("target", "random"):
        raise DSparkError(f"--init must be 'target' or 'random', got {opts.init!r}")
    draft_ids = None
    if opts.draft_vocab is not None and opts.draft_vocab < tc.vocab_size:
        eos = tc.eos_token_id if isinstance(tc.eos_token_id, list) else [tc.eos_token_id]
        draft_ids = choose_draft_vocab(out, seqs, opts.draft_vocab, tc.vocab_size,
                                       keep=[t for t in eos if t is not None])
        cfg.draft_vocab_size = int(draft_ids.numel())
    drafter = init_drafter(cfg, opts.seed)
    if opts.init == "target" and not (opts.resume and (out / "trainer_state").exists()):
        init_from_target(drafter, target)
    target_head = target.get_output_embeddings()
    lm_head = target_head
    if draft_ids is not None:
        lm_head = draft_lm_head(target_head.weight, draft_ids)
        drafter.draft_to_target = draft_ids
    drafter.attach_target(target.get_input_embeddings(), lm_head)
    drafter.train()
    params = [p for p in drafter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)

    per_epoch = math.ceil(len(seqs) / opts.batch_size)
    if opts.steps is not None:
        total = opts.steps
    elif opts.epochs is not None:
        total = max(1, int(round(opts.epochs * per_epoch)))
    else:
        total = per_epoch
    start, meta = 0, None
    if opts.resume:
        meta = load_state(out, drafter, optimizer)
        if meta is not None:
            start = int(meta["step"])
    if opts.stop_after is not None and start >= opts.stop_after:
        return out  # already paused at (or past) this point: nothing to do
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_NAME
    if log_path.exists():  # keep the curve clean: drop steps the resumed run will redo
        kept = [l for l in log_path.read_text().splitlines() if l.strip() and json.loads(l)["step"] < start]
        log_path.write_text("".join(l + "\n" for l in kept))
    (out / "training_args.json").write_text(json.dumps(dataclasses.asdict(opts), indent=2) + "\n")

    perms: dict[int, torch.Tensor] = {}
    correct = torch.zeros(drafter.num_drafts)
    count = torch.zeros(drafter.num_drafts)
    t0 = time.time()
    wall = float(meta.get("wall_seconds", 0.0)) if meta else 0.0
    bar = tqdm(total=total, initial=start, desc=f"train {opts.head}", unit="step", disable=not opts.progress)
    with log_path.open("a") as log:
        for step in range(start, total):
            step_start = time.perf_counter()
            epoch, idx = divmod(step, per_epoch)
            if epoch not in perms:
                perms = {epoch: torch.randperm(len(seqs), generator=torch.Generator().manual_seed(opts.seed * 7919 + epoch))}
            batch_seqs = [seqs[int(i)] for i in perms[epoch][idx * opts.batch_size : (idx + 1) * opts.batch_size]]
            if cache is not None:
                feats = [cache.features(s.line, cfg.target_layer_ids) for s in batch_seqs]
            else:
                feats = target_features(target, batch_seqs, cfg.target_layer_ids)
            if draft_ids is not None:  # a pruned vocabulary reads p_t from the draft rows + logz
                feats = [(t, f, _logz(cache, s.line, target_head, f)) for s, (t, f) in zip(batch_seqs, feats)]
            gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + step)
            batch = build_batch(batch_seqs, feats, opts.anchors_per_seq, cfg.block_size, cfg.mask_token_id, gen,
                                sample_from_anchor=cfg.sample_from_anchor)
            lr = lr_at(step, total, opts.lr, opts.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            res = drafter_loss(drafter, batch)
            optimizer.zero_grad(set_to_none=True)
            res.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()

            correct += res.correct
            count += res.count
            rec = {"step": step, "loss": float(res.loss.detach()), "ce": res.ce, "l1": res.l1, "bce": res.bce,
                   "lr": lr, "grad_norm": float(grad_norm),
                   "acc": [round(float(x), 4) for x in (res.correct / res.count.clamp_min(1))],
                   "tokens": int(res.count.sum()), "blocks": int(batch.valid[:, :, 0].sum()),
                   "seconds": round(time.perf_counter() - step_start, 4)}
            log.write(json.dumps(rec) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=_acc_text(correct, count))
            if (step + 1) % 20 == 0:
                correct.zero_()
                count.zero_()
            done = step + 1
            pause = opts.stop_after is not None and done >= opts.stop_after
            if done % opts.save_every == 0 or done == total or pause:
                log.flush()
                _save(drafter, out, optimizer, done, total, opts, wall + time.time() - t0)
            if pause:
                break
    bar.close()
    return out


def _logz(cache, line: int, target_head: torch.nn.Module, final: torch.Tensor) -> torch.Tensor:
    logz = cache.logz(line) if cache is not None else None
    if logz is None:  # a cache from before logz, or no cache: the full head, once per sequence here
        logz = log_partition(target_head, final)
    return logz


def _save(drafter: DSparkDrafter, out: Path, optimizer, step: int, total: int, opts: TrainOptions,
          wall: float) -> None:

    # The resumable state below is layout-independent; only the served files differ.
    save = save_native if opts.layout == "dflash" else save_drafter
    save(drafter, out, dtype=DTYPES[opts.save_dtype])
    save_state(out, drafter, optimizer, step, {"total_steps": total, "wall_seconds": round(wall, 1)})
