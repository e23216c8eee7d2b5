"""The arithmetic of grouped attention as one autograd Function that keeps no score matrix.

Autograd through the plain formula keeps, per layer, the exponentiated [P·G, T] scores of every head for
the backward pass: more than the layer's other activations together once T is large (and more than
SDPA's fused dense kernel, which keeps none). Here the forward pass keeps its inputs and each query's
softmax statistics (the running maximum and the normaliser) only, and the backward pass recomputes the
scores block by block, flash-attention style. Values and gradients are those of the plain formula:
the same scores, the same blocked entries (a constant, so no gradient through them), the same softcap.

Both passes walk the groups in chunks, so that even the transient matrices stay near `CHUNK_BYTES`
whatever P is (the paper's row has 10,112 group queries per head against 2,048 prefix keys).
"""

from __future__ import annotations

from typing import Any

import torch

CHUNK_BYTES = 64 * 2**20  # float32 score block of one chunk of groups, all heads


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # float32 for half precision, float64 stays float64


def group_chunks(query: torch.Tensor, prefix_len: int) -> list[slice]:
    """Slices over the group axis of q [B, Hkv, rep, P, G, D] whose [.., T + G] float32 scores fit `CHUNK_BYTES`."""
    batch, kv_heads, rep, groups, size, _ = query.shape
    per_group = batch * kv_heads * rep * size * (prefix_len + size) * 4
    step = max(1, CHUNK_BYTES // max(per_group, 1))
    return [slice(start, min(start + step, groups)) for start in range(0, groups, step)]


def _chunk(blocked: torch.Tensor, part: slice) -> torch.Tensor:
    # masks are [.., P, G, keys] or broadcast over the groups ([G, G] within a group)
    return blocked[..., part, :, :] if blocked.dim() == 6 else blocked


def _scores(q: torch.Tensor, k_prefix: torch.Tensor, k_group: torch.Tensor, scale: float, softcap: float | None,
            blocked_prefix: torch.Tensor, blocked_group: torch.Tensor):
    """(prefix scores [B, Hkv, rep, p, G, T], group scores [.., G], their softcap tanh or None), float32, blocked
    entries set to the dtype's lowest value (as the dense path's additive mask: never -inf)."""
    s_prefix = torch.einsum("bkrpgd,bktd->bkrpgt", q, k_prefix) * scale
    s_group = torch.einsum("bkrpgd,bkphd->bkrpgh", q, k_group) * scale
    tanhs = None
    if softcap is not None:
        tanhs = (torch.tanh(s_prefix / softcap), torch.tanh(s_group / softcap))
        s_prefix, s_group = tanhs[0] * softcap, tanhs[1] * softcap
    low = torch.finfo(s_prefix.dtype).min
    acc = _accumulation(q.dtype)
    s_prefix = s_prefix.masked_fill(blocked_prefix, low).to(acc)
    s_group = s_group.masked_fill(blocked_group, low).to(acc)
    return s_prefix, s_group, tanhs


class GroupedAttentionFunction(torch.autograd.Function):
    """out [B, Hkv, rep, P, G, D] = softmax over [prefix | own group] of q's scores, applied to the values.

    q [B, Hkv, rep, P, G, D]; k_prefix, v_prefix [B, Hkv, T, D] (shared by the rep query heads of a key head:
    grouped-query attention without copies); k_group, v_group [B, Hkv, P, G, D]; blocked_prefix broadcastable
    to [B, Hkv, rep, P, G, T] and blocked_group [G, G] (or 6-D like the prefix), True where a key may not be
    attended.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor, k_group: torch.Tensor,
                v_group: torch.Tensor, blocked_prefix: torch.Tensor, blocked_group: torch.Tensor, scale: float,
                softcap: float | None) -> torch.Tensor:
        out = torch.empty_like(q)
        stats = q.new_empty(*q.shape[:-1], 2, dtype=_accumulation(q.dtype))  # per query: the maximum and the normaliser
        for part in group_chunks(q, k_prefix.shape[2]):
            s_prefix, s_group, _ = _scores(q[:, :, :, part], k_prefix, k_group[:, :, part], scale, softcap,
                                           _chunk(blocked_prefix, part), _chunk(blocked_group, part))
            # one softmax over [prefix | group], merged by hand (log-sum-exp): no concatenated copy
            top = torch.maximum(s_prefix.amax(-1, keepdim=True), s_group.amax(-1, keepdim=True))
            e_prefix, e_group = (s_prefix - top).exp_(), (s_group - top).exp_()
            total = e_prefix.sum(-1, keepdim=True) + e_group.sum(-1, keepdim=True)
            o = (torch.einsum("bkrpgt,bktd->bkrpgd", e_prefix.to(q.dtype), v_prefix)
                 + torch.einsum("bkrpgh,bkphd->bkrpgd", e_group.to(q.dtype), v_group[:, :, part]))
            out[:, :, :, part] = (o.to(total.dtype) / total).to(q.dtype)
            # the maximum and normaliser, not their log-sum-exp: a fully blocked row has maximum = the lowest
            # float, which would swallow log(T + G) and turn its uniform probabilities into ones
            stats[:, :, :, part] = torch.cat([top, total], dim=-1)
        ctx.save_for_backward(q, k_prefix, v_prefix, k_group, v_group, blocked_prefix, blocked_group, stats)
        ctx.scale, ctx.softcap = scale, softcap
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor):
        q, k_prefix, v_prefix, k_group, v_group, blocked_prefix, blocked_group, stats = ctx.saved_tensors
        scale, softcap = ctx.scale, ctx.softcap
        need = ctx.needs_input_grad
        dq, dk_group, dv_group = (torch.zeros_like(t) if n else None
                                  for t, n in ((q, need[0]), (k_group, need[3]), (v_group, need[4])))
        # the prefix keys and values collect a sum over every chunk: in float32, cast once at the end
        dk_prefix, dv_prefix = (torch.zeros_like(t, dtype=stats.dtype) if n else None
                                for t, n in ((k_prefix, need[1]), (v_prefix, need[2])))
        for part in group_chunks(q, k_prefix.shape[2]):
            qc, kg, vg, go = q[:, :, :, part], k_group[:, :, part], v_group[:, :, part], grad_out[:, :, :, part]
            bp, bg = _chunk(blocked_prefix, part), _chunk(blocked_group, part)
            s_prefix, s_group, tanhs = _scores(qc, k_prefix, kg, scale, softcap, bp, bg)
            top, total = stats[:, :, :, part, :, 0:1], stats[:, :, :, part, :, 1:2]
            p_prefix = (s_prefix - top).exp_().div_(total)  # the forward pass's probabilities, recomputed
            p_group = (s_group - top).exp_().div_(total)
            del s_prefix, s_group
            if dv_prefix is not None:
                dv_prefix += torch.einsum("bkrpgt,bkrpgd->bktd", p_prefix.to(q.dtype), go)
            if dv_group is not None:
                dv_group[:, :, part] = torch.einsum("bkrpgh,bkrpgd->bkphd", p_group.to(q.dtype), go)
            # softmax backward: dS = P * (dP - sum_j P_j dP_j), dP = dO V^T, in float32
            dp_prefix = torch.einsum("bkrpgd,bktd->bkrpgt", go, v_prefix).to(stats.dtype)
            dp_group = torch.einsum("bkrpgd,bkphd->bkrpgh", go, vg).to(stats.dtype)
            row = (p_prefix * dp_prefix).sum(-1, keepdim=True) + (p_group * dp_group).sum(-1, keepdim=True)
            ds_prefix = dp_prefix.sub_(row).mul_(p_prefix).masked_fill_(bp, 0)  # blocked: a constant, no gradient
            ds_group = dp_group.sub_(row).mul_(p_group).masked_fill_(bg, 0)
            del p_prefix, p_group
            if tanhs is not None:  # s = c * tanh(raw / c): ds/draw = 1 - tanh^2
                ds_prefix.mul_(1 - tanhs[0].to(stats.dtype).square())
                ds_group.mul_(1 - tanhs[1].to(stats.dtype).square())
            ds_prefix, ds_group = (ds_prefix * scale).to(q.dtype), (ds_group * scale).to(q.dtype)
            if dq is not None:
                dq[:, :, :, part] = (torch.einsum("bkrpgt,bktd->bkrpgd", ds_prefix, k_prefix)
                                     + torch.einsum("bkrpgh,bkphd->bkrpgd", ds_group, kg))
            if dk_prefix is not None:
                dk_prefix += torch.einsum("bkrpgt,bkrpgd->bktd", ds_prefix, qc)
            if dk_group is not None:
                dk_group[:, :, part] = torch.einsum("bkrpgh,bkrpgd->bkphd", ds_group, qc)
        dk_prefix, dv_prefix = (None if g is None else g.to(q.dtype) for g in (dk_prefix, dv_prefix))
        return dq, dk_prefix, dv_prefix, dk_group, dv_group, None, None, None, None


def grouped_attention_core(q: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor, k_group: torch.Tensor,
                           v_group: torch.Tensor, blocked_prefix: torch.Tensor, blocked_group: torch.Tensor,
                           scale: float, softcap: float | None = None) -> torch.Tensor:
    """`GroupedAttentionFunction.apply` with its arguments named (shapes in the class docstring)."""
    return GroupedAttentionFunction.apply(q, k_prefix, v_prefix, k_group, v_group, blocked_prefix, blocked_group,
                                          scale, softcap)
