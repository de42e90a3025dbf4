"""llama2.c import: a random model written in llama2.c's layout must give the logits of llama2.c's own forward
(interleaved complex RoPE, written below from run.c), and a tokenizer.bin must encode/decode like run.c."""

import json
import struct

import pytest
import torch

from lora_lab.checkpoint import load_checkpoint
from lora_lab.formats.llama2c import convert_llama2c, interleaved_to_halves
from lora_lab.model import GPT
from lora_lab.tokenizer import Tokenizer
from lora_lab.utils import LoraLabError


# ---------------------------------------------------------------------------------------------------------------
# a llama2.c model: random weights, llama2.c's file layout, llama2.c's forward
# ---------------------------------------------------------------------------------------------------------------
def random_llama2c(dim=32, hidden=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab=40, seq_len=16, shared=True):
    kv_dim = dim // n_heads * n_kv_heads
    g = torch.Generator().manual_seed(1)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    w = {
        "token_embedding": r(vocab, dim, scale=1.0),
        "rms_att": 1 + r(n_layers, dim), "wq": r(n_layers, dim, dim), "wk": r(n_layers, kv_dim, dim),
        "wv": r(n_layers, kv_dim, dim), "wo": r(n_layers, dim, dim), "rms_ffn": 1 + r(n_layers, dim),
        "w1": r(n_layers, hidden, dim), "w2": r(n_layers, dim, hidden), "w3": r(n_layers, hidden, dim),
        "rms_final": 1 + r(dim),
    }
    if not shared:
        w["wcls"] = r(vocab, dim)
    header = (dim, hidden, n_layers, n_heads, n_kv_heads, vocab if shared else -vocab, seq_len)
    return header, w


def write_llama2c(path, header, w):
    dim, _, _, n_heads, _, _, seq_len = header
    hs = dim // n_heads
    freq = torch.zeros(seq_len, hs // 2)  # freq_cis_real / imag: written by the legacy exporter, unused
    parts = [w[k] for k in ("token_embedding", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3",
                            "rms_final")] + [freq, freq + 1] + ([w["wcls"]] if "wcls" in w else [])
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", *header))
        for p in parts:
            f.write(p.float().contiguous().numpy().astype("<f4").tobytes())


def llama2c_forward(header, w, tokens):
    """run.c's transformer(), for every position of `tokens` at once, in float64."""
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, _ = header
    hs = dim // n_heads
    w = {k: v.double() for k, v in w.items()}
    T = len(tokens)

    def rmsnorm(x, weight):
        return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5)

    # the rotation of pair (2i, 2i+1) of each head by pos * 10000^(-2i/hs), as a complex product
    pos = torch.arange(T, dtype=torch.float64)[:, None]  # (T, 1)
    freqs = 1.0 / 10000.0 ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs)  # (hs/2,)
    rot = torch.polar(torch.ones(T, hs // 2, dtype=torch.float64), pos * freqs)  # (T, hs/2)

    def rope(x):  # (T, nh, hs) with interleaved pairs
        xc = torch.view_as_complex(x.reshape(T, x.size(1), hs // 2, 2).contiguous())  # (T, nh, hs/2)
        return torch.view_as_real(xc * rot[:, None, :]).reshape(x.shape)

    x = w["token_embedding"][tokens]  # (T, dim)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for l in range(n_layers):
        h = rmsnorm(x, w["rms_att"][l])
        q = rope((h @ w["wq"][l].T).view(T, n_heads, hs))
        k = rope((h @ w["wk"][l].T).view(T, n_kv_heads, hs))
        v = (h @ w["wv"][l].T).view(T, n_kv_heads, hs)
        rep = n_heads // n_kv_heads  # head h reads key/value head h // rep, as run.c's `h / kv_mul`
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = torch.einsum("tnd,snd->nts", q, k) / hs**0.5  # (nh, T, T)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = torch.einsum("nts,snd->tnd", att, v).reshape(T, dim)
        x = x + y @ w["wo"][l].T
        h = rmsnorm(x, w["rms_ffn"][l])
        gate = h @ w["w1"][l].T
        x = x + (gate * torch.sigmoid(gate) * (h @ w["w3"][l].T)) @ w["w2"][l].T
    x = rmsnorm(x, w["rms_final"])
    return x @ w.get("wcls", w["token_embedding"]).T  # (T, vocab)


@pytest.mark.parametrize("shared", [True, False])
def test_logits_match_llama2c_forward(tmp_path, shared):
    header, w = random_llama2c(shared=shared)
    write_llama2c(tmp_path / "model.bin", header, w)
    with pytest.warns(UserWarning, match="no tokenizer"):
        config = convert_llama2c(tmp_path / "model.bin", tmp_path / "ckpt")
    assert (config.n_embd, config.intermediate_size, config.n_layer, config.n_head, config.n_query_groups,
            config.vocab_size, config.block_size) == (32, 48, 2, 4, 2, 40, 16)
    assert config.tie_embeddings is shared
    model = GPT.from_checkpoint(tmp_path / "ckpt")
    tokens = torch.tensor([1, 5, 9, 3, 39, 0, 17, 22, 8, 2, 11, 30])
    with torch.no_grad():
        logits = model(tokens[None])[0]
    expected = llama2c_forward(header, w, tokens).float()
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    # the non-rotary weights are copied unchanged
    _, sd = load_checkpoint(tmp_path / "ckpt")
    torch.testing.assert_close(sd["blocks.1.attn.v_proj.weight"], w["wv"][1], rtol=0, atol=0)
    torch.testing.assert_close(sd["blocks.0.mlp.gate_proj.weight"], w["w1"][0], rtol=0, atol=0)
    assert ("lm_head.weight" in sd) is not shared


def test_interleaved_to_halves_moves_pairs_to_halves():
    n_head, hs = 2, 6
    w = torch.arange(n_head * hs, dtype=torch.float32)[:, None]  # row index as the value
    out = interleaved_to_halves(w, n_head).flatten().tolist()
    # head 0 rows (0..5): pairs (0,1), (2,3), (4,5) -> firsts 0, 2, 4 then seconds 1, 3, 5
    assert out == [0, 2, 4, 1, 3, 5, 6, 8, 10, 7, 9, 11]


def test_truncated_file_is_one_line_error(tmp_path):
    header, w = random_llama2c()
    write_llama2c(tmp_path / "model.bin", header, w)
    data = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) - 100])
    with pytest.raises(LoraLabError, match="truncated") as e:
        convert_llama2c(tmp_path / "cut.bin", tmp_path / "ckpt")
    assert "\n" not in str(e.value) and "cut.bin" in str(e.value)
    assert not (tmp_path / "ckpt" / "model.safetensors").exists()


def test_bad_header_and_new_format_are_one_line_errors(tmp_path):
    (tmp_path / "zeros.bin").write_bytes(bytes(28 + 64))
    with pytest.raises(LoraLabError, match="valid llama2.c header"):
        convert_llama2c(tmp_path / "zeros.bin", tmp_path / "ckpt")
    (tmp_path / "v1.bin").write_bytes(struct.pack("<Ii", 0x616B3432, 1) + bytes(248))
    with pytest.raises(LoraLabError, match="--version 0"):
        convert_llama2c(tmp_path / "v1.bin", tmp_path / "ckpt")


# ---------------------------------------------------------------------------------------------------------------
# tokenizer.bin
# ---------------------------------------------------------------------------------------------------------------
# A small SentencePiece-style vocabulary: every multi-character piece is two pieces joined, scores all distinct
# and not in vocabulary order ("er" outranks "he" from a later id), so the merge order must follow the scores:
# " her" is " h" + "er", not " he" + "r"
CHARS = list(" acdehlorstwTé")
MERGED = {" t": -1, "he": -5, " the": -3, "at": -4, " c": -2, " cat": -6, "ll": -7, "llo": -8, " he": -9,
          " hello": -10, " w": -11, "or": -12, " wor": -13, "ld": -14, " world": -15, " s": -16, " sat": -17,
          "  ": -18, "   ": -19, "er": -0.5, " T": -21, " The": -22, "  a": -23, " h": -24}


def tiny_vocab():
    pieces = ["<unk>", "\n<s>\n", "\n</s>\n"] + [f"<0x{b:02X}>" for b in range(256)]
    scores = [0.0] * len(pieces)
    pieces += list(MERGED) + CHARS
    scores += list(MERGED.values()) + [-100.0 - i for i in range(len(CHARS))]
    return pieces, scores


def write_tokenizer_bin(path, pieces, scores):
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max(len(p.encode()) for p in pieces)))
        for p, s in zip(pieces, scores):
            b = p.encode()
            f.write(struct.pack("<fi", s, len(b)) + b)


def llama2c_encode(pieces, scores, text, bos=True):
    """run.c's encode(): dummy prefix, UTF-8 characters (bytes + 3 when unknown), best-score merges."""
    lookup = {p: i for i, p in enumerate(pieces)}
    tokens = [1] if bos else []
    if text:
        tokens.append(lookup[" "])
    for ch in text:
        if ch in lookup:
            tokens.append(lookup[ch])
        else:
            tokens += [b + 3 for b in ch.encode()]
    while True:
        best = (-1e10, -1, -1)  # (score, id, index)
        for i in range(len(tokens) - 1):
            j = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]], -1)
            if j != -1 and scores[j] > best[0]:
                best = (scores[j], j, i)
        if best[2] == -1:
            return tokens
        tokens[best[2]: best[2] + 2] = [best[1]]


def llama2c_decode(pieces, tokens):
    """run.c's decode() over a sequence: drop the space after BOS, turn <0xXX> pieces into their byte."""
    out, prev = b"", None
    for t in tokens:
        piece = pieces[t]
        if t in (1, 2):
            prev = t
            continue
        if prev == 1 and piece.startswith(" "):
            piece = piece[1:]
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            out += bytes([int(piece[3:5], 16)])
        else:
            out += piece.encode()
        prev = t
    return out.decode("utf-8", errors="replace")


TEXTS = ["her", "hello world", "The cat sat", "the  cat   sat", " leading space", "Tea at three",
         "héllo wörld ☃ 日本",
         "a\nnew line", "x", "worldhello"]


def test_tokenizer_bin_encodes_and_decodes_like_llama2c(tmp_path):
    pieces, scores = tiny_vocab()
    write_tokenizer_bin(tmp_path / "tok.bin", pieces, scores)
    header, w = random_llama2c(vocab=len(pieces))
    write_llama2c(tmp_path / "model.bin", header, w)
    convert_llama2c(tmp_path / "model.bin", tmp_path / "ckpt", tokenizer_path=tmp_path / "tok.bin")
    tok = Tokenizer(tmp_path / "ckpt")
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert 1 in tok.eos_ids  # llama2.c models end a story with BOS
    for text in TEXTS:
        ids = tok.encode(text).tolist()
        assert ids == llama2c_encode(pieces, scores, text), text
        assert tok.decode(ids) == llama2c_decode(pieces, ids) == text
    assert tok.encode("").tolist() == [1]
    assert tok.encode("hello", bos=False, eos=True).tolist() == llama2c_encode(pieces, scores, "hello", bos=False) + [2]
    # multi-character pieces were really used (the test is not all characters and bytes)
    assert len(tok.encode(" hello world", bos=False)) == 3
    assert [tok.decode([i]) for i in tok.encode("her", bos=False)] == ["h", "er"]
    tok_config = json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())
    assert tok_config["bos_token"] == "<s>" and tok_config["add_bos_token"] is True


def test_tokenizer_bin_size_must_match_model(tmp_path):
    pieces, scores = tiny_vocab()
    write_tokenizer_bin(tmp_path / "tok.bin", pieces, scores)
    header, w = random_llama2c(vocab=len(pieces) + 1)
    write_llama2c(tmp_path / "model.bin", header, w)
    with pytest.raises(LoraLabError, match="tokens but"):
        convert_llama2c(tmp_path / "model.bin", tmp_path / "ckpt", tokenizer_path=tmp_path / "tok.bin")
    (tmp_path / "cut.bin").write_bytes((tmp_path / "tok.bin").read_bytes()[:-3])
    with pytest.raises(LoraLabError, match="truncated"):
        convert_llama2c(tmp_path / "model.bin", tmp_path / "ckpt", tokenizer_path=tmp_path / "cut.bin")
