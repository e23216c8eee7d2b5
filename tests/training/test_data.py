import pytest
import torch
from tiny_models import word_tokenizer

from dca.training.data import (
    BatchSchedule,
    is_held_out,
    leading_bos,
    pack,
    sample_positions,
    split_texts,
    tokenize_and_pack,
)


def test_pack_concatenates_with_separators_and_drops_the_tail():
    packed = pack([[1, 2, 3], [4, 5], [6]], seq_len=4, separator_id=0)
    assert packed.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6]]  # the final separator is the dropped tail
    assert pack([[1, 2]], seq_len=4, separator_id=None).shape == (0, 4)
    with pytest.raises(ValueError, match="seq_len"):
        pack([[1]], seq_len=1, separator_id=None)


def test_tokenize_and_pack_uses_the_eos_as_separator():
    packed = tokenize_and_pack(["the cat", "a dog runs"], word_tokenizer(), seq_len=3)
    tok = word_tokenizer()
    assert packed.flatten().tolist() == tok("the cat </s> a dog runs")["input_ids"][:6]


def test_tokenize_and_pack_starts_every_sequence_with_bos_when_the_tokenizer_does():
    from tokenizers import processors

    tok = word_tokenizer()
    assert leading_bos(tok) is None  # like SmolLM2's: sequences are packed as before
    tok.add_special_tokens({"bos_token": "<s>"})
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    assert leading_bos(tok) == tok.bos_token_id  # like Gemma's
    packed = tokenize_and_pack(["the cat", "a dog runs"], tok, seq_len=4)
    body = tok("the cat </s> a dog runs", add_special_tokens=False)["input_ids"]
    assert packed.tolist() == [[tok.bos_token_id, *body[:3]], [tok.bos_token_id, *body[3:6]]]


def test_held_out_split_is_stable_and_disjoint():
    texts = [f"document number {i}" for i in range(2000)]
    train, held = split_texts(texts, 0.1)
    assert not set(train) & set(held) and len(train) + len(held) == 2000
    assert 120 < len(held) < 280
    # order and corpus growth do not move a document across the split
    train2, held2 = split_texts(list(reversed(texts)) + ["new doc"], 0.1)
    assert set(held) <= set(held2) and set(held2) - set(held) <= {"new doc"}
    assert all(is_held_out(t, 0.1) for t in held)
    with pytest.raises(ValueError):
        split_texts(texts, 0.0)


def test_positions_are_distinct_sorted_and_leave_a_next_token():
    gen = torch.Generator().manual_seed(0)
    pos = sample_positions(50, 10, 9, gen)
    assert pos.shape == (50, 9)
    for row in pos.tolist():
        assert row == sorted(set(row)) and row == list(range(9))  # all of [0, 8] when P = T - 1
    pos = sample_positions(200, 64, 4, gen, min_position=30)
    assert pos.min() >= 30 and pos.max() <= 62 and (pos.diff(dim=1) > 0).all()
    assert len(set(pos.flatten().tolist())) > 25  # spread over the range
    with pytest.raises(ValueError, match="distinct"):
        sample_positions(1, 10, 10, gen)


def test_batch_schedule_is_a_function_of_seed_and_index():
    seqs = torch.arange(40 * 8).view(40, 8)
    a, b = BatchSchedule(seqs, 4, 3, seed=1), BatchSchedule(seqs, 4, 3, seed=1)
    for k in (0, 5, 9, 10, 23):  # 10 batches per epoch: 10 and 23 fall in later epochs
        assert torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1])
    epoch = torch.cat([a[k][0][:, 0] for k in range(10)])
    assert sorted(epoch.tolist()) == list(range(0, 320, 8))  # each sequence once per epoch
    assert not torch.equal(a[0][0], BatchSchedule(seqs, 4, 3, seed=2)[0][0])
    with pytest.raises(ValueError, match="training sequences"):
        BatchSchedule(seqs[:2], 4, 3, seed=0)


def test_delays_leave_the_batches_and_positions_of_a_run_without_them():
    seqs = torch.arange(40 * 12).view(40, 12)
    plain, late = BatchSchedule(seqs, 4, 5, seed=1), BatchSchedule(seqs, 4, 5, seed=1, max_delay=3)
    counts = torch.zeros(4, dtype=torch.long)
    for k in range(30):
        ids, positions, delays = late[k]
        assert plain[k][2] is None and torch.equal(plain[k][0], ids) and torch.equal(plain[k][1], positions)
        assert delays.shape == positions.shape and int(delays.min()) >= 0 and int(delays.max()) <= 3
        assert bool((positions + delays <= 12 - 2).all())  # x[t+d+1] exists
        counts += torch.bincount(delays.flatten(), minlength=4)
    assert bool((counts > 60).all())  # every delay 0..3 is drawn (600 draws)
    assert torch.equal(late[7][2], BatchSchedule(seqs, 4, 5, seed=1, max_delay=3)[7][2])
