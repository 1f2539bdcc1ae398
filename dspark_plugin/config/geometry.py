"""Block geometry facts every layer shares (config, model, trainer, engine adapters)."""
from __future__ import annotations


def drafts_per_block(block_size: int, sample_from_anchor: bool = True) -> int:
    """gamma: anchor-first blocks draft from every slot, the DFlash layout (anchor + masks, drafts
    from the masks only) from the `block_size - 1` masks."""
    return block_size if sample_from_anchor else block_size - 1
