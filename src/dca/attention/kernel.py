"""The arithmetic of grouped attention as one autograd Function that keeps no score matrix.

Autograd through the plain formula keeps, per layer, the exponentiated [P·G, T] scores of every head for
the backward pass: more than the layer's other activations together once T is large (and more than
SDPA's fused dense kernel, which keeps none). Here the forward pass keeps its inputs, its output and
each query's softmax statistics (the maximum and the normaliser) only, and the backward pass recomputes
the scores block by block, flash-attention style. Values and gradients are those of the plain formula:
the same scores, the same blocked entries (a constant, so no gradient through them), the same softcap.

Both passes walk the groups in chunks (`chunks`): the transient matrices stay near `CHUNK_BYTES` whatever
P is (the paper's row has 10,112 group queries per head against 2,048 prefix keys), and a chunk scores
only the prefix keys that one of its queries may see. Groups come sorted by insertion point, so a chunk of
early groups skips most of the prefix: about half of the prefix scores are never computed. A skipped
key would have weighed exp(lowest - max) = 0 exactly, so nothing changes but the work.
"""

from __future__ import annotations

from typing import Any

import torch

CHUNK_BYTES = 64 * 2**20  # float32 score block of one chunk of groups, all heads
MIN_CHUNKS = 8  # split P at least this much (where P allows), so that chunks can skip the keys they never see
MIN_CHUNK_BYTES = 2**20  # but no smaller than this: below it a chunk's Python costs more than the keys it skips


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # float32 for half precision, float64 stays float64


def chunks(q: torch.Tensor, blocked_prefix: torch.Tensor, blocked_group: torch.Tensor
           ) -> list[tuple[slice, slice, bool]]:
    """(groups, prefix keys, whether a query is blocked everywhere) per chunk: slices of the group axis of q
    [B, Hkv, rep, P, G, D] whose float32 scores fit `CHUNK_BYTES`, each with the span of prefix keys that some
    query of the chunk may attend."""
    batch, kv_heads, rep, groups, size, _ = q.shape
    prefix_len = blocked_prefix.shape[-1]
    per_group = max(1, batch * kv_heads * rep * size * (prefix_len + size) * 4)
    step = max(1, min(CHUNK_BYTES // per_group, max(-(-groups // MIN_CHUNKS), MIN_CHUNK_BYTES // per_group)))
    out = []
    for start in range(0, groups, step):
        part = slice(start, min(start + step, groups))
        seen = (~_chunk(blocked_prefix, part)).flatten(0, -2).any(0).nonzero()  # [keys seen, 1]
        # a query blocked everywhere weighs all T + G keys alike (as the dense path does): keep them all then
        nowhere = bool((_chunk(blocked_prefix, part).all(-1) & _chunk(blocked_group, part).all(-1)).any())
        keys = slice(0, prefix_len) if nowhere or len(seen) == 0 else slice(int(seen[0]), int(seen[-1]) + 1)
        out.append((part, keys, nowhere))
    return out


def _chunk(blocked: torch.Tensor, part: slice) -> torch.Tensor:
    # masks are [.., P, G, keys] or broadcast over the groups ([G, G] within a group)
    return blocked[..., part, :, :] if blocked.dim() == 6 else blocked


def _scores(q: torch.Tensor, k_prefix: torch.Tensor, k_group: torch.Tensor, softcap: float | None,
            blocked_prefix: torch.Tensor, blocked_group: torch.Tensor):
    """(prefix scores [B, Hkv, rep, p, G, T], group scores [.., G], their softcap tanh or None) of the scaled
    queries q, in the accumulation dtype, blocked entries set to the dtype's lowest value (as the dense path's
    additive mask: never -inf, so a row blocked everywhere is uniform rather than NaN)."""
    s_prefix = torch.einsum("bkrpgd,bktd->bkrpgt", q, k_prefix)
    s_group = torch.einsum("bkrpgd,bkphd->bkrpgh", q, k_group)
    tanhs = None
    if softcap is not None:
        tanhs = (torch.tanh(s_prefix / softcap), torch.tanh(s_group / softcap))
        s_prefix, s_group = tanhs[0] * softcap, tanhs[1] * softcap
    low = torch.finfo(s_prefix.dtype).min
    acc = _accumulation(q.dtype)
    return s_prefix.masked_fill_(blocked_prefix, low).to(acc), s_group.masked_fill_(blocked_group, low).to(acc), tanhs


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
        acc = _accumulation(q.dtype)
        out = torch.empty_like(q)
        out_acc = out if out.dtype == acc else torch.empty_like(q, dtype=acc)  # what backward's row sums read
        stats = q.new_empty(*q.shape[:-1], 2, dtype=acc)  # per query: the maximum and the normaliser
        ctx.chunks = chunks(q, blocked_prefix, blocked_group)
        scaled = q * scale  # scaling the queries, not the [.., T] scores: one pass over a small tensor
        for part, keys, _ in ctx.chunks:
            s_prefix, s_group, _ = _scores(scaled[:, :, :, part], k_prefix[:, :, keys], k_group[:, :, part], softcap,
                                           _chunk(blocked_prefix, part)[..., keys], _chunk(blocked_group, part))
            # one softmax over [prefix | group], merged by hand (log-sum-exp): no concatenated copy
            top = torch.maximum(s_prefix.amax(-1, keepdim=True), s_group.amax(-1, keepdim=True))
            e_prefix, e_group = s_prefix.sub_(top).exp_(), s_group.sub_(top).exp_()
            total = e_prefix.sum(-1, keepdim=True) + e_group.sum(-1, keepdim=True)
            o = (torch.einsum("bkrpgt,bktd->bkrpgd", e_prefix.to(q.dtype), v_prefix[:, :, keys])
                 + torch.einsum("bkrpgh,bkphd->bkrpgd", e_group.to(q.dtype), v_group[:, :, part]))
            out_acc[:, :, :, part] = o.to(acc) / total
            # the maximum and normaliser, not their log-sum-exp: a fully blocked row has maximum = the lowest
            # float, which would swallow log(T + G) and turn its uniform probabilities into ones
            stats[:, :, :, part] = torch.cat([top, total], dim=-1)
        if out_acc is not out:
            out.copy_(out_acc)
        ctx.save_for_backward(q, k_prefix, v_prefix, k_group, v_group, blocked_prefix, blocked_group, stats, out_acc)
        ctx.scale, ctx.softcap = scale, softcap
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k_prefix, v_prefix, k_group, v_group, blocked_prefix, blocked_group, stats, out = ctx.saved_tensors
        scale, softcap, acc = ctx.scale, ctx.softcap, stats.dtype
        need = ctx.needs_input_grad
        dq, dk_group, dv_group = (torch.zeros_like(t) if n else None
                                  for t, n in ((q, need[0]), (k_group, need[3]), (v_group, need[4])))
        # the prefix keys and values collect a sum over every chunk: in float32, cast once at the end
        dk_prefix, dv_prefix = (torch.zeros_like(t, dtype=acc) if n else None
                                for t, n in ((k_prefix, need[1]), (v_prefix, need[2])))
        scaled = q * scale
        # softmax backward: dS = P * (dP - sum_j P_j dP_j) with dP = dO V^T, and sum_j P_j dP_j = dO . O per query
        row = (grad_out.to(acc) * out).sum(-1, keepdim=True)
        for part, keys, nowhere in ctx.chunks:
            qc, kg, vg, go = scaled[:, :, :, part], k_group[:, :, part], v_group[:, :, part], grad_out[:, :, :, part]
            kp, vp = k_prefix[:, :, keys], v_prefix[:, :, keys]
            bp, bg = _chunk(blocked_prefix, part)[..., keys], _chunk(blocked_group, part)
            s_prefix, s_group, tanhs = _scores(qc, kp, kg, softcap, bp, bg)
            top, total = stats[:, :, :, part, :, 0:1], stats[:, :, :, part, :, 1:2]
            # the forward pass's probabilities, recomputed; blocked entries come out exactly 0 (so their gradient
            # does too), except in a row blocked everywhere, whose uniform weights need the division
            if nowhere:
                p_prefix, p_group = s_prefix.sub_(top).exp_().div_(total), s_group.sub_(top).exp_().div_(total)
            else:
                shift = top + total.log()
                p_prefix, p_group = s_prefix.sub_(shift).exp_(), s_group.sub_(shift).exp_()
            if dv_prefix is not None:
                dv_prefix[:, :, keys] += torch.einsum("bkrpgt,bkrpgd->bktd", p_prefix.to(q.dtype), go)
            if dv_group is not None:
                dv_group[:, :, part] = torch.einsum("bkrpgh,bkrpgd->bkphd", p_group.to(q.dtype), go)
            rows = row[:, :, :, part]
            ds_prefix = torch.einsum("bkrpgd,bktd->bkrpgt", go, vp).to(acc).sub_(rows).mul_(p_prefix)
            ds_group = torch.einsum("bkrpgd,bkphd->bkrpgh", go, vg).to(acc).sub_(rows).mul_(p_group)
            del p_prefix, p_group, s_prefix, s_group
            if nowhere:  # blocked entries are a constant: no gradient
                ds_prefix.masked_fill_(bp, 0)
                ds_group.masked_fill_(bg, 0)
            if tanhs is not None:  # s = c * tanh(raw / c): ds/draw = 1 - tanh^2
                ds_prefix.mul_(1 - tanhs[0].to(acc).square())
                ds_group.mul_(1 - tanhs[1].to(acc).square())
            ds_prefix, ds_group = ds_prefix.to(q.dtype), ds_group.to(q.dtype)
            if dq is not None:  # the scale on [.., D] results rather than on [.., T] score gradients
                dq[:, :, :, part] = (torch.einsum("bkrpgt,bktd->bkrpgd", ds_prefix, kp)
                                     + torch.einsum("bkrpgh,bkphd->bkrpgd", ds_group, kg)) * scale
            if dk_prefix is not None:
                dk_prefix[:, :, keys] += torch.einsum("bkrpgt,bkrpgd->bktd", ds_prefix, qc)
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
