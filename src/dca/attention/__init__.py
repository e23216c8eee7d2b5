"""How the groups of the one-pass objective attend: the dense reference (`dca.masks`: one additive mask
over all T + P·G keys) or `grouped` (linear in P, the default). Importing this package registers the
grouped implementation with transformers' `AttentionInterface`, once, under its own name."""

from transformers import AttentionInterface

from dca.attention.grouped import GROUPED, GroupLayout, grouped_attention, use_grouped_attention

GROUP_ATTENTION = ("grouped", "dense")  # AugmentedLM.group_attention

_registered = AttentionInterface._global_mapping.get(GROUPED)
if _registered is not None and _registered is not grouped_attention:
    raise RuntimeError(f"another attention implementation is already registered as {GROUPED!r}")
AttentionInterface.register(GROUPED, grouped_attention)

__all__ = ["GROUPED", "GROUP_ATTENTION", "GroupLayout", "grouped_attention", "use_grouped_attention"]
