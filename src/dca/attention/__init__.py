"""How the groups of the one-pass objective attend: the dense reference (`dca.masks`: one additive mask
over all T + P·G keys) or `grouped` (linear in P, the default). Importing this package registers the
grouped implementation with transformers' `AttentionInterface`, once, under its own name."""

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from dca.attention.grouped import GROUPED, GroupLayout, grouped_attention, use_grouped_attention

GROUP_ATTENTION = ("grouped", "dense")  # AugmentedLM.group_attention

_registered = AttentionInterface._global_mapping.get(GROUPED)
if _registered is not None and _registered is not grouped_attention:
    raise RuntimeError(f"another attention implementation is already registered as {GROUPED!r}")
AttentionInterface.register(GROUPED, grouped_attention)
# while a model is switched, its calls without groups (other threads) still need their usual causal masks: the
# additive ones, which eager and SDPA attention both take; group passes hand in a ready 4D mask and skip this
AttentionMaskInterface.register(GROUPED, eager_mask)

__all__ = ["GROUPED", "GROUP_ATTENTION", "GroupLayout", "grouped_attention", "use_grouped_attention"]
