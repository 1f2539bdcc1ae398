"""One speculative step, engine-free: tap target states, draft a block, verify it losslessly."""
