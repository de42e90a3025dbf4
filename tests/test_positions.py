"""Per-row positions in one batch: padding on either side, packed samples (segment_ids), and rows of a KV cache at
different points of their sequences (a (B,) input_pos). In every case each sequence gets exactly the logits it
gets alone, which is what batched evaluation, classifiers, packing and a server batching requests rely on."""

import pytest
import torch

from lora_lab import GPT, Config
from lora_lab.model import segment_positions_and_mask

FAMILIES = {
    "llama-gqa": dict(n_layer=2, n_embd=32, n_head=4, n_query_groups=2, vocab_size=64, block_size=64),
    "mistral-window": dict(n_layer=2, n_embd=32, n_head=4, n_query_groups=1, vocab_size=64, block_size=64,
                           sliding_window=4),
    "neox-partial-rope": dict(n_layer=2, n_embd=32, n_head=4, vocab_size=64, block_size=64, rotary_percentage=0.25,
                              parallel_residual=True, norm_class="LayerNorm", mlp_class="gelu", bias=True),
}
LENGTHS = (7, 3, 11)


def tiny(kw) -> GPT:
    torch.manual_seed(0)
    return GPT(Config(**kw)).eval()


def seqs(lengths=LENGTHS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (n,), generator=g) for n in lengths]


def alone(model, seq) -> torch.Tensor:
    with torch.no_grad():
        return model(seq[None])[0]  # (T, vocab)


def test_segment_positions_and_mask():
    positions, mask = segment_positions_and_mask(torch.tensor([[0, 0, 1, 1, 1, 2]]))
    assert positions.tolist() == [[0, 1, 0, 1, 2, 0]]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [0, 0, 1, 0, 0, 0],
                             [0, 0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 1, 0],
                             [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)
    # a window of 2: each token sees itself and the one before it in its segment
    _, windowed = segment_positions_and_mask(torch.tensor([[5, 5, 5, 5]]), window=2)
    assert windowed[0, 0].sum(1).tolist() == [1, 2, 2, 2]
    # the same id again after another segment starts a new segment
    positions, mask = segment_positions_and_mask(torch.tensor([[3, 3, 4, 3]]))
    assert positions.tolist() == [[0, 1, 0, 0]] and not mask[0, 0, 3, :3].any()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_on_either_side_gives_each_row_its_own_logits(family, side):
    model = tiny(FAMILIES[family])
    rows = seqs()
    T = max(LENGTHS)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    real = torch.zeros(len(rows), T, dtype=torch.long)  # an HF-style attention mask: 1 = real token
    for b, s in enumerate(rows):
        where = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        idx[b, where], real[b, where] = s, 1
    with torch.no_grad():
        logits = model(idx, segment_ids=real)  # (B, T, vocab)
    for b, s in enumerate(rows):
        assert torch.isfinite(logits[b]).all()  # padding queries must not produce NaN
        torch.testing.assert_close(logits[b][real[b].bool()], alone(model, s), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_samples_get_the_logits_they_get_alone(family):
    model = tiny(FAMILIES[family])
    rows = seqs()
    packed = torch.cat(rows)[None]  # (1, sum of lengths)
    segment_ids = torch.cat([torch.full((len(s),), i) for i, s in enumerate(rows)])[None]
    with torch.no_grad():
        logits = model(packed, segment_ids=segment_ids)[0]
    torch.testing.assert_close(logits, torch.cat([alone(model, s) for s in rows]), atol=1e-5, rtol=1e-5)
    # without the segments the later samples would see the earlier ones: the test can tell
    with torch.no_grad():
        assert not torch.allclose(model(packed)[0][len(rows[0]):], logits[len(rows[0]):], atol=1e-3)


def test_one_segment_is_the_plain_causal_forward():
    model = tiny(FAMILIES["llama-gqa"])
    idx = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(idx, segment_ids=torch.zeros_like(idx)), model(idx), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_row_cache_positions_decode_each_row_as_alone(family):
    """Right-padded prompts prefilled together, then decoded with one position per row: every row's logits at
    every step equal that sequence's own full forward (the padding written into the cache is never read)."""
    model = tiny(FAMILIES[family])
    prompts, steps = seqs(), 6
    g = torch.Generator().manual_seed(2)
    continuations = torch.randint(0, 64, (len(prompts), steps), generator=g)  # (B, steps) fed one per step
    T = max(LENGTHS)
    idx = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, s in enumerate(prompts):
        idx[b, :len(s)] = s
    lengths = torch.tensor([len(s) for s in prompts])
    model.set_kv_cache(batch_size=len(prompts), max_seq_length=T + steps)
    with torch.no_grad():
        prefill = model(idx, input_pos=0)  # (B, T, vocab)
        decoded = [model(continuations[:, i:i + 1], input_pos=lengths + i)[:, 0] for i in range(steps)]
    model.clear_kv_cache()
    for b, s in enumerate(prompts):
        full = alone(model, torch.cat((s, continuations[b])))  # (len + steps, vocab)
        torch.testing.assert_close(prefill[b, :len(s)], full[:len(s)], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.stack([d[b] for d in decoded]), full[len(s):], atol=1e-5, rtol=1e-5)


def test_segment_ids_refuse_a_later_cache_step():
    model = tiny(FAMILIES["llama-gqa"])
    model.set_kv_cache(batch_size=1, max_seq_length=16)
    with pytest.raises(ValueError, match="segment_ids"):
        model(torch.zeros(1, 2, dtype=torch.long), input_pos=3, segment_ids=torch.zeros(1, 2))
