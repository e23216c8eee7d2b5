"""How the groups of the one-pass objective attend: the dense reference (`dca.masks`: one additive mask
over all T + P·G keys), `grouped` (linear in P, exact, any device) or `flex` (PyTorch's flex attention
with a block mask: the fused CUDA path); `auto`, the default, takes flex where it runs (`flex_supported`)
and grouped elsewhere. Importing this package registers both implementations with transformers'
`AttentionInterface`, once each, under their own names."""

from typing import Literal, get_args

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from dca.attention.flex import FLEX, FlexLayout, flex_group_attention, flex_supported, group_mask_mod
from dca.attention.grouped import GROUPED, GroupLayout, grouped_attention, use_grouped_attention

GroupAttention = Literal["auto", "grouped", "flex", "dense"]  # AugmentedLM.group_attention
GROUP_ATTENTION = get_args(GroupAttention)

for _name, _function in ((GROUPED, grouped_attention), (FLEX, flex_group_attention)):
    _registered = AttentionInterface._global_mapping.get(_name)
    if _registered is not None and _registered is not _function:
        raise RuntimeError(f"another attention implementation is already registered as {_name!r}")
    AttentionInterface.register(_name, _function)
    # while a model is switched, its calls without groups (other threads) still need their usual causal masks:
    # the additive ones, which eager and SDPA attention both take; group passes hand in a ready 4D mask and skip this
    AttentionMaskInterface.register(_name, eager_mask)

__all__ = ["FLEX", "GROUPED", "GROUP_ATTENTION", "FlexLayout", "GroupAttention", "GroupLayout", "flex_group_attention",
           "flex_supported", "group_mask_mod", "grouped_attention", "use_grouped_attention"]
