"""GGUF import on small files written here with gguf.GGUFWriter: dequantized values, llama.cpp's Q/K row
permutation undone, metadata -> Config, Llama 3 RoPE scaling, embedded vocabularies -> tokenizer.json, and
one-line errors for unsupported types, architectures and truncated files."""

import io
import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from lora_lab.checkpoint import load_checkpoint
from lora_lab.config import Config
from lora_lab.formats.gguf_import import convert_gguf
from lora_lab.model import GPT, llama3_scale
from lora_lab.tokenizer import Tokenizer
from lora_lab.utils import LoraLabError

CONFIG = Config(name="tiny", block_size=64, vocab_size=48, n_layer=2, n_embd=64, n_head=4, n_query_groups=2,
                intermediate_size=96, rope_base=10000.0, norm_eps=1e-5, tie_embeddings=True)

# our name -> llama.cpp's (written here independently of the converter's table)
LAYER = {"norm_1": "attn_norm", "norm_2": "ffn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k",
         "attn.v_proj": "attn_v", "attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}
GLOBAL = {"wte": "token_embd", "norm_f": "output_norm", "lm_head": "output"}

# files written without a vocabulary warn that the checkpoint has no tokenizer (checked once below)
pytestmark = pytest.mark.filterwarnings("ignore:.*has no tokenizer")


def gguf_name(name: str) -> str:
    stem, suffix = name.rsplit(".", 1)
    if stem in GLOBAL:
        return f"{GLOBAL[stem]}.{suffix}"
    _, i, rest = stem.split(".", 2)
    return f"blk.{i}.{LAYER[rest]}.{suffix}"


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Q and K of llama models."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_weights(config: Config, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = GPT(config)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k in sd:
        if "norm" in k:
            sd[k] = 1 + 0.1 * torch.randn_like(sd[k])  # not all ones, so a mix-up would show
    if config.tie_embeddings:
        sd.pop("lm_head.weight")
    return sd


def write_gguf(path, config: Config, sd: dict, types: dict = None, arch: str = "llama", meta: dict = None,
               vocab=None, extra_tensors: dict = None):
    """A GGUF file as llama.cpp's converter would write it: Q/K permuted, tensors quantized as `types` says."""
    types = types or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", config.n_layer)
    w.add_uint32(f"{arch}.context_length", config.block_size)
    w.add_uint32(f"{arch}.embedding_length", config.n_embd)
    w.add_uint32(f"{arch}.feed_forward_length", config.intermediate_size)
    w.add_uint32(f"{arch}.attention.head_count", config.n_head)
    w.add_uint32(f"{arch}.attention.head_count_kv", config.n_query_groups)
    w.add_float32(f"{arch}.rope.freq_base", config.rope_base)
    w.add_uint32(f"{arch}.rope.dimension_count", config.head_size)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.norm_eps)
    w.add_uint32("general.file_type", 7)
    if config.head_size != config.n_embd // config.n_head:
        w.add_uint32(f"{arch}.attention.key_length", config.head_size)
        w.add_uint32(f"{arch}.attention.value_length", config.head_size)
    for key, value in (meta or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    for name, t in sd.items():
        a = t.float().numpy()
        if config.norm_unit_offset and "norm" in name:
            a = a + 1  # llama.cpp stores Gemma's RMSNorm scale (1 + weight)
        if arch == "llama" and name.endswith("q_proj.weight"):
            a = llamacpp_permute(a, config.n_head)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            a = llamacpp_permute(a, config.n_query_groups)
        qtype = types.get(name, Q.F32)
        if qtype == Q.F32:
            w.add_tensor(gguf_name(name), a)
        elif qtype == Q.F64:
            w.add_tensor(gguf_name(name), a.astype(np.float64))
        else:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    for name, a in (extra_tensors or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def roundtrip(t: torch.Tensor, qtype) -> torch.Tensor:
    """What quantizing then dequantizing `t` gives, by the gguf package itself."""
    if qtype == Q.F32:
        return t.float()
    a = gguf.quants.dequantize(gguf.quants.quantize(t.float().numpy(), qtype), qtype)
    return torch.from_numpy(np.array(a, dtype=np.float32)).reshape(t.shape)


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------------------------------
# weights and config
# ---------------------------------------------------------------------------------------------------------------
def test_f32_file_gives_the_original_weights_and_logits(tmp_path):
    sd = random_weights(CONFIG)
    write_gguf(tmp_path / "m.gguf", CONFIG, sd)
    with pytest.warns(UserWarning, match="has no tokenizer"):
        config = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    for field in ("block_size", "vocab_size", "n_layer", "n_embd", "n_head", "head_size", "n_query_groups",
                  "intermediate_size", "rope_base", "tie_embeddings", "rotary_percentage", "norm_class", "mlp_class"):
        assert getattr(config, field) == getattr(CONFIG, field), field
    assert config.norm_eps == pytest.approx(1e-5)
    assert config.extra["source"] == "gguf" and config.extra["gguf_file_type"] == "MOSTLY_Q8_0"
    _, out = load_checkpoint(tmp_path / "out")
    assert set(out) == set(sd)
    for k in sd:  # Q and K rows are back in rotate-half order, bit for bit
        torch.testing.assert_close(out[k], sd[k], rtol=0, atol=0, msg=k)
    ref = GPT(CONFIG)
    ref.load_weights(sd)
    model = GPT.from_checkpoint(tmp_path / "out")
    idx = torch.randint(0, CONFIG.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx), rtol=0, atol=0)


TYPES = {"wte.weight": Q.Q8_0, "lm_head.weight": Q.Q4_1,
         "blocks.0.attn.q_proj.weight": Q.Q8_0, "blocks.0.attn.k_proj.weight": Q.Q4_0,
         "blocks.0.attn.v_proj.weight": Q.F16, "blocks.0.attn.o_proj.weight": Q.BF16,
         "blocks.0.mlp.gate_proj.weight": Q.Q4_1, "blocks.0.mlp.up_proj.weight": Q.Q5_0,
         "blocks.0.mlp.down_proj.weight": Q.Q5_1,
         "blocks.1.attn.q_proj.weight": Q.Q4_0, "blocks.1.attn.k_proj.weight": Q.Q8_0,
         "blocks.1.attn.v_proj.weight": Q.Q4_1, "blocks.1.mlp.down_proj.weight": Q.F16,
         "blocks.1.norm_1.weight": Q.F16}


def test_quantized_tensors_are_dequantized_and_unpermuted(tmp_path):
    config = Config(**{**CONFIG.to_dict(), "tie_embeddings": False})
    sd = random_weights(config, seed=1)
    write_gguf(tmp_path / "m.gguf", config, sd, types=TYPES)
    out_config = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert out_config.tie_embeddings is False
    _, out = load_checkpoint(tmp_path / "out")
    assert set(out) == set(sd)
    for k, t in sd.items():
        qtype = TYPES.get(k, Q.F32)
        # quantization works on blocks within a row, so un-permuting the rows of the dequantized Q/K must give
        # exactly the round trip of the original (un-permuted) tensor
        torch.testing.assert_close(out[k], roundtrip(t, qtype), rtol=0, atol=0, msg=k)
        assert out[k].dtype == torch.float32
        tol = {Q.F32: 0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 0.02}.get(qtype, 0.15)
        assert (out[k] - t).abs().max() <= tol * max(1.0, t.abs().max().item()), k


def test_dtype_argument(tmp_path):
    sd = random_weights(CONFIG)
    write_gguf(tmp_path / "m.gguf", CONFIG, sd)
    convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="bfloat16")
    _, out = load_checkpoint(tmp_path / "out")
    assert all(v.dtype == torch.bfloat16 for v in out.values())
    torch.testing.assert_close(out["wte.weight"], sd["wte.weight"].bfloat16(), rtol=0, atol=0)


def test_qwen2_biases_are_loaded_without_permutation(tmp_path):
    config = Config(**{**CONFIG.to_dict(), "attn_qkv_bias": True})
    sd = random_weights(config, seed=2)
    for k in [k for k in sd if k.endswith("_proj.bias")]:
        sd[k] = torch.randn_like(sd[k])
    write_gguf(tmp_path / "m.gguf", config, sd, arch="qwen2")
    out_config = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert out_config.attn_qkv_bias is True and out_config.bias is False
    _, out = load_checkpoint(tmp_path / "out")
    for k in sd:
        torch.testing.assert_close(out[k], sd[k], rtol=0, atol=0, msg=k)


def test_gemma_config_and_norms(tmp_path):
    config = Config(name="tiny", block_size=64, vocab_size=48, n_layer=2, n_embd=64, n_head=2, head_size=48,
                    n_query_groups=1, intermediate_size=96, norm_eps=1e-6, norm_unit_offset=True, mlp_class="geglu",
                    gelu_approximate="tanh", tie_embeddings=True, scale_embeddings=True)
    sd = random_weights(config, seed=3)
    write_gguf(tmp_path / "m.gguf", config, sd, arch="gemma")
    out_config = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    for field in ("head_size", "n_query_groups", "norm_unit_offset", "mlp_class", "gelu_approximate",
                  "scale_embeddings", "tie_embeddings", "rotary_percentage"):
        assert getattr(out_config, field) == getattr(config, field), field
    _, out = load_checkpoint(tmp_path / "out")
    for k in sd:  # no permutation for Gemma (NeoX-style RoPE in llama.cpp), norms back to `weight`
        torch.testing.assert_close(out[k], sd[k], rtol=0, atol=1e-6, msg=k)


def llama3_factors(base, dim, **scaling):
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return (inv_freq / llama3_scale(inv_freq, **scaling)).numpy().astype(np.float32)  # wavelength multipliers


@pytest.mark.parametrize("low, high", [(1.0, 4.0), (2.0, 8.0)])
def test_llama3_rope_scaling_from_rope_freqs(tmp_path, low, high):
    config = Config(name="tiny", block_size=64, vocab_size=32, n_layer=1, n_embd=128, n_head=2, n_query_groups=1,
                    intermediate_size=64, rope_base=500000.0, tie_embeddings=True)
    scaling = dict(factor=8.0, low_freq_factor=low, high_freq_factor=high, original_max_seq_len=8192)
    sd = random_weights(config)
    write_gguf(tmp_path / "m.gguf", config, sd,
               extra_tensors={"rope_freqs.weight": llama3_factors(500000.0, 64, **scaling)})
    out_config = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert out_config.rope_scaling.keys() == scaling.keys()
    for key, value in scaling.items():
        assert out_config.rope_scaling[key] == pytest.approx(value, rel=1e-3), key
    _, out = load_checkpoint(tmp_path / "out")
    assert "rope_freqs.weight" not in out and set(out) == set(sd)


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------
def test_unsupported_tensor_type_is_one_line_error(tmp_path):
    sd = random_weights(CONFIG)
    write_gguf(tmp_path / "m.gguf", CONFIG, sd, types={"blocks.1.norm_2.weight": Q.F64})
    with pytest.raises(LoraLabError) as e:
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    msg = one_line(e)
    assert "blk.1.ffn_norm.weight" in msg and "F64" in msg and "Q8_0" in msg and "Q4_K" in msg
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("keep", [0.5, 0.97, 200])
def test_truncated_file_is_one_line_error(tmp_path, keep):
    sd = random_weights(CONFIG)
    write_gguf(tmp_path / "m.gguf", CONFIG, sd)
    data = (tmp_path / "m.gguf").read_bytes()
    n = keep if isinstance(keep, int) else int(len(data) * keep)
    (tmp_path / "cut.gguf").write_bytes(data[:n])
    with pytest.raises(LoraLabError) as e:
        convert_gguf(tmp_path / "cut.gguf", tmp_path / "out")
    assert "cut.gguf" in one_line(e)


def test_not_a_gguf_file_and_unsupported_arch(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(LoraLabError, match="not a readable GGUF") as e:
        convert_gguf(tmp_path / "x.gguf", tmp_path / "out")
    one_line(e)
    write_gguf(tmp_path / "stablelm.gguf", CONFIG, random_weights(CONFIG), arch="stablelm")
    with pytest.raises(LoraLabError, match="'stablelm' is not supported") as e:
        convert_gguf(tmp_path / "stablelm.gguf", tmp_path / "out")
    one_line(e)
    with pytest.raises(LoraLabError, match="does not exist"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------------
# tokenizers embedded in the GGUF
# ---------------------------------------------------------------------------------------------------------------
CORPUS = """The quick brown fox jumps over the lazy dog, and the dog does not mind at all.
A small model can still learn that the cat sat on the mat while the rain fell outside.
Numbers like 12345 and 678 appear here too, with symbols: #, $, %, & and (parentheses).
She said, "Let's go to the park!" and they went together in the afternoon sun.
Over the hills and far away, the travellers walked until the evening came.
Über café naïve résumé — accents and dashes make the vocabulary a little richer.
Tabs\tand  double  spaces   and newlines
are part of the text as well.""".splitlines()
SAMPLES = ["The quick brown fox", "the cat sat on the mat", " leading space", "double  spaces   here",
           "new\nlines\n\nand\ttabs", "numbers 12345 and 9", "unknown characters: ☃ 日本 🙂", "", "a"]


def sentencepiece_model():
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 4), model_writer=buf, vocab_size=340,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, add_dummy_prefix=True, hard_vocab_limit=False,
                                   unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


def sp_type(sp, i) -> int:
    if sp.is_unknown(i):
        return 2
    if sp.is_control(i):
        return 3
    if sp.is_byte(i):
        return 6
    return 1


def test_sentencepiece_vocab_becomes_an_equivalent_tokenizer(tmp_path):
    sp = sentencepiece_model()
    n = sp.vocab_size()
    config = Config(**{**CONFIG.to_dict(), "vocab_size": n})
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
            "tokenizer.ggml.token_type": [sp_type(sp, i) for i in range(n)],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    write_gguf(tmp_path / "m.gguf", config, random_weights(config), meta=meta)
    convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    tok = Tokenizer(tmp_path / "out")
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True)
    used_merges = 0
    for text in SAMPLES + CORPUS:
        expected = sp.encode(text)
        assert tok.encode(text).tolist() == [1] + expected, text
        assert tok.decode(expected) == sp.decode(expected) == text
        used_merges += sum(len(sp.id_to_piece(i)) > 1 and not sp.is_byte(i) for i in expected)
    assert used_merges > 20
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2}
    assert GPT.from_checkpoint(tmp_path / "out").config.prompt_style == "plain"


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_level_bpe():
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def test_byte_level_bpe_vocab_chat_template_and_special_tokens(tmp_path):
    ref = byte_level_bpe()
    d = json.loads(ref.to_str())
    vocab = sorted(d["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    assert [i for _, i in vocab] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in d["model"]["merges"]]
    config = Config(**{**CONFIG.to_dict(), "vocab_size": len(tokens)})
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.token_type": [3 if t.startswith("<|") else 1 for t in tokens],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": False,
            "tokenizer.chat_template": CHATML}
    write_gguf(tmp_path / "m.gguf", config, random_weights(config), meta=meta)
    config = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert config.prompt_style == "chatml"
    tok = Tokenizer(tmp_path / "out")
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
    for text in SAMPLES + CORPUS:
        expected = ref.encode(text).ids
        assert tok.encode(text).tolist() == expected, text
        assert tok.decode(expected) == text
    # special tokens in the text are single ids
    assert tok.encode("<|im_start|>user\nhi<|im_end|>").tolist()[:1] == [1]
    tok_config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == CHATML and tok_config["eos_token"] == "<|im_end|>"


def test_tokenizer_files_next_to_the_gguf_are_copied(tmp_path):
    ref = byte_level_bpe()
    n = ref.get_vocab_size()
    config = Config(**{**CONFIG.to_dict(), "vocab_size": n})
    src = tmp_path / "src"
    src.mkdir()
    write_gguf(src / "m.gguf", config, random_weights(config), meta={"tokenizer.chat_template": CHATML})
    ref.save(str(src / "tokenizer.json"))
    convert_gguf(src / "m.gguf", tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert GPT.from_checkpoint(tmp_path / "out").config.prompt_style == "chatml"
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraLabError, match="no tokenizer.json or tokenizer.model"):
        convert_gguf(src / "m.gguf", tmp_path / "out2", tokenizer_dir=tmp_path / "empty")
