"""The grouped-attention Function alone: exact gradients (gradcheck, float64) and the plain formula's values."""

import pytest
import torch

from dca.attention import kernel
from dca.attention.kernel import grouped_attention_core


def plain(q, k_prefix, v_prefix, k_group, v_group, blocked_prefix, blocked_group, scale, softcap):
    """The formula through autograd, one softmax over [prefix | own group] (what the Function must equal)."""
    s_prefix = torch.einsum("bkrpgd,bktd->bkrpgt", q, k_prefix) * scale
    s_group = torch.einsum("bkrpgd,bkphd->bkrpgh", q, k_group) * scale
    if softcap is not None:
        s_prefix, s_group = torch.tanh(s_prefix / softcap) * softcap, torch.tanh(s_group / softcap) * softcap
    low = torch.finfo(q.dtype).min
    scores = torch.cat([s_prefix.masked_fill(blocked_prefix, low),
                        s_group.masked_fill(blocked_group, low)], dim=-1).softmax(-1)
    t = k_prefix.shape[2]
    return (torch.einsum("bkrpgt,bktd->bkrpgd", scores[..., :t], v_prefix)
            + torch.einsum("bkrpgh,bkphd->bkrpgd", scores[..., t:], v_group))


def inputs(window=None, dtype=torch.float64, batch=2, kv_heads=2, rep=2, groups=3, size=3, prefix=5, dim=4):
    """Grouped-query shapes (2 query heads per key head) with padding, a group whose prefix is fully blocked and
    one query row blocked everywhere (its probabilities are uniform: a constant, as in the dense path)."""
    torch.manual_seed(0)
    q = torch.randn(batch, kv_heads, rep, groups, size, dim, dtype=dtype)
    k_prefix, v_prefix = (torch.randn(batch, kv_heads, prefix, dim, dtype=dtype) for _ in range(2))
    k_group, v_group = (torch.randn(batch, kv_heads, groups, size, dim, dtype=dtype) for _ in range(2))
    insert_at = torch.tensor([[0, 2, 4], [1, 3, 4]])
    kv = torch.arange(prefix)
    blocked_prefix = kv > insert_at[:, :, None, None]  # [B, P, 1, T]: key kv after the group's t
    blocked_prefix = blocked_prefix.expand(batch, groups, size, prefix).clone()
    blocked_prefix[0, :, :, 0] = True  # row 0 starts with a padding token
    blocked_prefix[1, 0] = True  # group 0 of row 1 sees no prefix at all
    member = torch.arange(size)
    blocked_group = member[None, :] > member[:, None]  # causal within the group
    if window is not None:
        blocked_group = blocked_group | (member[:, None] - member[None, :] >= window)
    blocked_prefix = blocked_prefix[:, None, None]
    blocked_prefix, blocked_group = blocked_prefix.clone(), blocked_group.clone()
    # one query blocked everywhere: row 1, group 0, member 0 also loses itself (only here: a test of the corner)
    blocked_group = blocked_group.expand(batch, kv_heads, rep, groups, size, size).clone()
    blocked_group[1, :, :, 0, 0, 0] = True
    tensors = [t.requires_grad_() for t in (q, k_prefix, v_prefix, k_group, v_group)]
    return (*tensors, blocked_prefix, blocked_group)


@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.parametrize("min_chunks", [1, 8])  # one chunk, and one group per chunk (each with its own keys)
def test_gradcheck(monkeypatch, softcap, window, min_chunks):
    monkeypatch.setattr(kernel, "MIN_CHUNKS", min_chunks)
    monkeypatch.setattr(kernel, "MIN_CHUNK_BYTES", 1)
    args = inputs(window)

    def function(*tensors):
        return grouped_attention_core(*tensors, *args[5:], 0.7, softcap)

    assert torch.autograd.gradcheck(function, args[:5], eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_the_plain_formula(monkeypatch, softcap, dtype):
    monkeypatch.setattr(kernel, "CHUNK_BYTES", 1)  # one group per chunk
    args = inputs(window=2, dtype=dtype)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    out = grouped_attention_core(*args, 0.7, softcap)
    expected = plain(*args, 0.7, softcap)
    torch.testing.assert_close(out, expected, **tol)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, args[:5], grad_out)
    expected_grads = torch.autograd.grad(expected, args[:5], grad_out)
    for name, grad, reference in zip(("q", "k_prefix", "v_prefix", "k_group", "v_group"), grads, expected_grads,
                                     strict=True):
        torch.testing.assert_close(grad, reference, **tol, msg=name)
        assert reference.abs().sum() > 0, name


@pytest.mark.parametrize("needs", [(0,), (1,), (2,), (3,), (4,), (1, 3), (0, 4)])
def test_gradients_of_any_subset_of_the_inputs(needs):
    """Only the inputs that require grad get one, each equal to the plain formula's (a frozen prefix, say)."""
    args = [t.detach() for t in inputs()[:5]] + list(inputs()[5:])
    for i in needs:
        args[i].requires_grad_()
    grad_out = torch.randn(args[0].shape, dtype=args[0].dtype)
    wanted = [args[i] for i in needs]
    grads = torch.autograd.grad(grouped_attention_core(*args, 0.7), wanted, grad_out)
    expected = torch.autograd.grad(plain(*args, 0.7, None), wanted, grad_out)
    for i, grad, reference in zip(needs, grads, expected, strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-10, atol=1e-12, msg=str(i))


def test_bfloat16_inputs_stay_close_to_float32():
    args = inputs(dtype=torch.float32)
    half = [t.detach().bfloat16().requires_grad_() if t.is_floating_point() else t for t in args]
    out, out_half = grouped_attention_core(*args, 0.7), grouped_attention_core(*half, 0.7)
    assert out_half.dtype == torch.bfloat16
    torch.testing.assert_close(out_half.float(), out, rtol=3e-2, atol=3e-2)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, args[:5], grad_out)
    grads_half = torch.autograd.grad(out_half, half[:5], grad_out.bfloat16())
    for grad, grad_half in zip(grads, grads_half, strict=True):
        assert grad_half.dtype == torch.bfloat16
        torch.testing.assert_close(grad_half.float(), grad, rtol=5e-2, atol=5e-2)


def test_chunks_skip_the_prefix_keys_no_query_sees(monkeypatch):
    monkeypatch.setattr(kernel, "CHUNK_BYTES", 1)
    *_, blocked_prefix, blocked_group = inputs()
    q = torch.zeros(2, 2, 2, 3, 3, 4)
    # group 0 of row 1 has a query blocked everywhere: all keys; group 1 sees up to t = 3 (row 1), group 2 all
    assert kernel.chunks(q, blocked_prefix, blocked_group) == [(slice(0, 1), slice(0, 5), True),
                                                                (slice(1, 2), slice(0, 4), False),
                                                                (slice(2, 3), slice(0, 5), False)]
    blocked_prefix[:, :, :, :, :, 0] = True  # nobody sees key 0 now: every chunk but the first skips it
    assert [keys for _, keys, _ in kernel.chunks(q, blocked_prefix, blocked_group)] == [slice(0, 5), slice(1, 4),
                                                                                      slice(1, 5)]


def test_chunks_take_as_many_groups_as_fit_the_byte_budget_and_split_p_at_least_min_chunks_ways(monkeypatch):
    groups, size, prefix = 17, 3, 5
    q = torch.zeros(2, 2, 2, groups, size, 4)
    blocked_prefix = torch.zeros(2, 1, 1, groups, size, prefix, dtype=torch.bool)
    blocked_group = torch.zeros(size, size, dtype=torch.bool)
    per_group = 2 * 2 * 2 * size * (prefix + size) * 4  # float32 scores of one group, all heads and rows

    def sizes():
        return [part.stop - part.start for part, _, _ in kernel.chunks(q, blocked_prefix, blocked_group)]

    monkeypatch.setattr(kernel, "MIN_CHUNK_BYTES", 2**40)  # the budget alone decides
    monkeypatch.setattr(kernel, "CHUNK_BYTES", 5 * per_group)
    assert sizes() == [5, 5, 5, 2]
    monkeypatch.setattr(kernel, "CHUNK_BYTES", 5 * per_group - 1)
    assert sizes() == [4, 4, 4, 4, 1]
    monkeypatch.setattr(kernel, "CHUNK_BYTES", 2**40)  # room for all: still split into MIN_CHUNKS = 8 or more
    monkeypatch.setattr(kernel, "MIN_CHUNK_BYTES", 1)
    assert sizes() == [3, 3, 3, 3, 3, 2]  # MIN_CHUNKS = 8: ceil(17 / 8) = 3 groups each
