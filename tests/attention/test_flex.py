"""Flex attention's group path against the dense reference: its mask predicate at every (query, key) on CPU, its
forward values on CPU (eager flex attention), gradients and bf16 on CUDA only (torch 2.13 has no flex attention
backward on CPU; the fused kernel exists on GPUs only)."""

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, padded_batch, tiny_decoder
from torch.nn.attention.flex_attention import create_block_mask, create_mask

from dca import AugmentedLM, CoprocessorConfig
from dca.attention import FLEX, FlexLayout, flex_supported, group_mask_mod, use_grouped_attention
from dca.masks import group_attention_allowed, prefix_position_ids

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (flex attention's kernel, backward)")
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def random_layout(seed: int, batch=3, length=13, groups=4, size=5, causal=True, replaced=0,
                  padded_from=0) -> FlexLayout:
    """Padding on either side, insertion points anywhere (including in padding and repeated, as delays give)."""
    generator = torch.Generator().manual_seed(seed)
    valid = torch.ones(batch, length, dtype=torch.long)
    valid[1, : int(torch.randint(1, 5, (), generator=generator))] = 0  # left padding
    valid[2, length - int(torch.randint(1, 5, (), generator=generator)):] = 0  # right padding
    insert_at = torch.randint(0, length, (batch, groups), generator=generator).sort(dim=1).values
    return FlexLayout(valid, prefix_position_ids(valid), insert_at, size, causal, replaced=replaced,
                      padded_from=padded_from)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 1, 3, 8])
# "overwrite" with N = 2, 4: points with fewer real tokens hide latents; (2, 1): R = 2 of N = 3, the appended one first
@pytest.mark.parametrize(("replaced", "padded_from"), [(0, 0), (2, 0), (4, 0), (2, 1)])
def test_the_mask_predicate_equals_the_dense_rule_at_every_query_and_key(seed, causal, window, replaced, padded_from):
    layout = random_layout(seed, causal=causal, replaced=replaced, padded_from=padded_from)
    batch, groups = layout.insert_at.shape
    queries, keys = groups * layout.group_size, layout.prefix_valid.shape[1] + groups * layout.group_size
    expected = group_attention_allowed(layout.prefix_valid, layout.prefix_positions, layout.insert_at,
                                       layout.group_size, causal_within_group=causal, sliding_window=window,
                                       replaced=replaced, padded_from=padded_from)
    dense = create_mask(group_mask_mod(layout, window), batch, 1, queries, keys, device="cpu")[:, 0]
    assert torch.equal(dense, expected)
    # and the block mask a pass uses carries that predicate
    block_mask = layout.block_mask(window)
    assert block_mask.shape == (batch, 1, queries, keys)
    assert torch.equal(create_mask(block_mask.mask_mod, batch, 1, queries, keys, device="cpu")[:, 0], expected)
    assert layout.block_mask(window) is block_mask  # built once per pass and window, shared by the layers


def test_the_block_mask_visits_only_the_prefix_and_each_groups_own_block():
    """With blocks of one group each, the group part of the block mask is the identity: the work is linear in P."""
    groups, size = 6, 4
    layout = random_layout(0, length=3 * size, groups=groups, size=size)
    prefix_blocks = 3
    block_mask = create_block_mask(group_mask_mod(layout), 3, None, groups * size, (prefix_blocks + groups) * size,
                                   device="cpu", BLOCK_SIZE=size)
    visited = block_mask.to_dense()[:, 0].bool()  # [B, query blocks, key blocks]
    eye = torch.eye(groups, dtype=torch.bool).expand(3, -1, -1)
    assert torch.equal(visited[:, :, prefix_blocks:], eye)



def losses(model, mode, *args, **kwargs):
    model.group_attention = mode
    return model.training_loss(*args, **kwargs).token_losses


def assert_flex_forward_equals_dense(model, *args, **kwargs):
    with torch.no_grad():  # CPU flex attention runs forward only
        dense, flex = losses(model, "dense", *args, **kwargs), losses(model, "flex", *args, **kwargs)
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-6)
    assert dense.abs().sum() > 0


POSITIONS = torch.tensor([[0, 6, 12, 17], [5, 9, 14, 18], [1, 7, 11, 13]])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("config", [
    {},  # the default: replay layout, causal soft tokens
    {"latent_positions": "after", "soft_token_attention": "full", "lora_rank": 2},
    {"latent_positions": "shared", "latent_source": "pre_norm", "init": "scratch"},
])
def test_flex_forward_equals_dense_with_padding(family, config):
    torch.manual_seed(0)
    model, input_ids, attention_mask = padded_batch(family, "eager", config)
    assert_flex_forward_equals_dense(model, input_ids, POSITIONS, attention_mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_flex_forward_equals_dense_under_overwrite(family):
    """Latents that replace the last N cache entries: each group sees x[0..t-N], its slots N earlier; at points
    with fewer than N real tokens the latents that replace nothing are hidden."""
    torch.manual_seed(0)
    model, input_ids, attention_mask = padded_batch(family, "eager", {"latent_positions": "overwrite"})
    assert_flex_forward_equals_dense(model, input_ids, POSITIONS, attention_mask)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_flex_forward_equals_dense_with_delays_and_sdpa(family):
    torch.manual_seed(0)
    model, input_ids, attention_mask = padded_batch(family, "sdpa" if family == "llama" else "eager",
                                                    {"latent_positions": "after", "lora_rank": 2})
    delays = torch.tensor([[3, 0, 2, 1], [1, 3, 0, 2], [2, 1, 3, 0]])
    assert_flex_forward_equals_dense(model, input_ids, torch.tensor([[0, 6, 12, 17], [5, 9, 14, 15], [1, 7, 11, 13]]),
                                     attention_mask, delays=delays)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_flex_forward_equals_dense_when_groups_outgrow_the_sliding_window(family):
    torch.manual_seed(0)
    model = AugmentedLM.from_decoder(tiny_decoder(family, "eager"), CoprocessorConfig(
        num_latents=3, num_ahead=8, gate_init=0.5))
    assert_flex_forward_equals_dense(model, torch.randint(0, VOCAB, (2, 30)), torch.tensor([[2, 10, 20], [4, 15, 27]]))


def test_flex_forward_equals_dense_under_strong_logit_softcapping():
    decoder = tiny_decoder("gemma2", "eager")
    for layer in decoder.model.layers:
        layer.self_attn.attn_logit_softcapping = 0.5  # the tiny model's 50 barely bends its small logits
    torch.manual_seed(0)
    model = AugmentedLM.from_decoder(decoder, CoprocessorConfig(num_latents=3, num_ahead=4, gate_init=0.5))
    assert_flex_forward_equals_dense(model, torch.randint(0, VOCAB, (2, 16)), torch.tensor([[2, 8, 12], [4, 9, 13]]))


def test_flex_forward_equals_dense_with_three_query_heads_per_key_head():
    # not a power of 2: the keys are copied per query head rather than shared (enable_gqa)
    torch.manual_seed(0)
    model, input_ids, attention_mask = padded_batch("llama", "eager", {}, num_attention_heads=6, head_dim=8)
    assert_flex_forward_equals_dense(model, input_ids, POSITIONS, attention_mask)


def test_flex_forward_under_bf16_autocast_is_close_to_dense():
    """Training runs under bf16 autocast where the device has it: flex attention takes the autocast dtype."""
    torch.manual_seed(0)
    model, input_ids, attention_mask = padded_batch("gemma3", "eager", {})
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        dense, flex = (losses(model, mode, input_ids, POSITIONS, attention_mask) for mode in ("dense", "flex"))
    torch.testing.assert_close(flex.float(), dense.float(), rtol=2e-2, atol=2e-2)  # bf16 rounding, two paths


def test_the_compiled_path_traces_gives_the_same_values_and_compiles_once(monkeypatch):
    """What CUDA runs, short of its kernels: flex attention and the block mask through torch.compile (dynamo and AOT
    autograd, here without code generation), the same values, and a pass with new insertion points (new tensors in
    the predicate, same shapes) reuses the compiled graphs."""
    import torch._dynamo

    compiled = {}
    monkeypatch.setattr("dca.attention.flex._on_cuda", lambda fn, device: compiled.setdefault(
        fn, torch.compile(fn, backend="aot_eager")))
    torch.manual_seed(0)
    model, input_ids, attention_mask = padded_batch("gemma2", "eager", {})  # softcapping, two windows, GQA
    try:
        assert_flex_forward_equals_dense(model, input_ids, POSITIONS, attention_mask)
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert_flex_forward_equals_dense(model, input_ids, (POSITIONS - 1).clamp(min=0), attention_mask)
    finally:
        torch._dynamo.reset()
    assert len(compiled) == 2  # flex_attention and create_block_mask


def test_auto_takes_grouped_on_cpu_and_flex_only_where_its_kernel_runs(monkeypatch):
    small, wide = tiny_decoder("llama").config, tiny_decoder("gpt2", n_head=2).config  # head dims 8 and 16
    assert not flex_supported(small, "cuda") and flex_supported(wide, "cuda") and not flex_supported(wide, "cpu")
    model = AugmentedLM.from_decoder(tiny_decoder("gpt2", "eager", n_head=2),
                                     CoprocessorConfig(num_latents=2, num_ahead=2))
    assert model.group_attention == "auto"

    def no_flex(*args):
        raise AssertionError("group_attention='auto' took flex on CPU")

    monkeypatch.setattr(FlexLayout, "block_mask", no_flex)
    model.training_loss(torch.randint(0, VOCAB, (1, 10)), torch.tensor([[3, 6]])).loss.backward()


def test_the_implementation_is_restored_and_calls_without_groups_meanwhile_run_it():
    model = AugmentedLM.from_decoder(tiny_decoder("gemma2", "eager"), CoprocessorConfig(num_latents=2, num_ahead=2))
    ids = torch.randint(0, VOCAB, (2, 9))
    plain = model.decoder(ids).logits
    with use_grouped_attention(model.decoder, implementation=FLEX):
        assert model.decoder.config._attn_implementation == FLEX
        torch.testing.assert_close(model.decoder(ids).logits, plain, rtol=0, atol=0)  # no groups: as before
    assert model.decoder.config._attn_implementation == "eager"


# ---------------------------------------------------------------- CUDA only: the compiled kernel and its backward
WIDE = {"gpt2": {"n_head": 2}}  # every family at head dim 16, the kernel's least
CUDA_IMPLS = [(f, i) for f in FAMILIES for i in ("eager", "sdpa") if not (f == "gemma2" and i == "sdpa")]


@pytest.fixture
def compiled_kernels():
    """Room for the compiled graphs of every test's shapes, windows and softcaps, and an error rather than a silent
    fall-back to eager flex attention where that room runs out: the CUDA tests test the compiled kernels."""
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
        yield


def cuda(test):
    return pytest.mark.usefixtures("compiled_kernels")(needs_cuda(test))


def cuda_batch(family, impl, config=None):
    torch.manual_seed(0)
    model, input_ids, attention_mask = padded_batch(family, impl, config or {}, **WIDE.get(family, {"head_dim": 16}))
    return model.cuda(), input_ids.cuda(), attention_mask.cuda()


def loss_and_grads(model, mode, *args, **kwargs):
    model.group_attention = mode
    model.zero_grad(set_to_none=True)
    out = model.training_loss(*args, **kwargs)
    out.loss.backward()
    return out.token_losses, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@cuda
@pytest.mark.parametrize(("family", "impl"), CUDA_IMPLS)
@pytest.mark.parametrize("config", [{}, {"latent_positions": "after", "soft_token_attention": "full", "lora_rank": 2}])
def test_cuda_flex_losses_and_gradients_equal_dense(family, impl, config):
    model, input_ids, attention_mask = cuda_batch(family, impl, config)
    positions = POSITIONS.cuda()
    dense, dense_grads = loss_and_grads(model, "dense", input_ids, positions, attention_mask)
    flex, flex_grads = loss_and_grads(model, "flex", input_ids, positions, attention_mask)
    # float32 on both sides, but different kernels and reduction orders
    torch.testing.assert_close(flex, dense, rtol=1e-4, atol=1e-5)
    assert flex_grads.keys() == dense_grads.keys() and len(dense_grads) > 0
    for name, grad in dense_grads.items():
        torch.testing.assert_close(flex_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
        assert grad.abs().sum() > 0, name


@cuda
def test_cuda_auto_takes_flex(monkeypatch):
    model, input_ids, attention_mask = cuda_batch("llama", "sdpa")
    built, real = [], FlexLayout.block_mask
    monkeypatch.setattr(FlexLayout, "block_mask", lambda self, window: built.append(window) or real(self, window))
    assert model.group_attention == "auto"
    model.training_loss(input_ids, POSITIONS.cuda(), attention_mask)
    assert built


@cuda
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_cuda_flex_in_bf16_autocast_is_close_to_dense(family):
    """Training runs under bf16 autocast on CUDA: there flex's losses stay near the dense path's, and its gradients
    are finite."""
    model, input_ids, attention_mask = cuda_batch(family, "eager")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with torch.no_grad():
            dense = losses(model, "dense", input_ids, POSITIONS.cuda(), attention_mask)
        flex, grads = loss_and_grads(model, "flex", input_ids, POSITIONS.cuda(), attention_mask)
    assert grads and all(torch.isfinite(grad).all() for grad in grads.values())
    torch.testing.assert_close(flex.float(), dense.float(), rtol=2e-2, atol=2e-2)  # bf16 rounding, two kernels


@cuda
def test_cuda_a_new_layout_of_the_same_shapes_does_not_recompile():
    """The kernel is compiled once: a pass with other insertion points (new block masks) reuses it."""
    import torch._dynamo

    torch._dynamo.reset()  # compiled here, not by an earlier test
    model, input_ids, attention_mask = cuda_batch("gemma2", "eager")  # softcapping, two windows
    model.group_attention = "flex"
    model.training_loss(input_ids, POSITIONS.cuda(), attention_mask).loss.backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        model.training_loss(input_ids, (POSITIONS - 1).clamp(min=0).cuda(), attention_mask).loss.backward()
