"""Imports of real checkpoints (from the shared assets folder) against published outputs and transformers.

- stories260K (llama2.c): greedy decoding from BOS reproduces the sample published with the model.
- SmolLM2-135M-Instruct (GGUF, Q4_1/Q8_0): answers the ChatML capital-of-France prompt, and its logits equal
  transformers' on our Hugging Face export of the converted checkpoint.
- Tokenizers (SmolLM2 tokenizer.json, the vocabulary embedded in its GGUF, Llama 2 tokenizer.model and the
  same vocabulary as llama2.c tokenizer.bin) give the ids of transformers / SentencePiece on Shakespeare.
"""

import json
import re
import shutil

import pytest
import torch

from lora_lab.checkpoint import load_config
from lora_lab.generate import generate
from lora_lab.model import GPT
from lora_lab.tokenizer import Tokenizer

SMOLLM = "models/smollm2-135m-instruct"
GGUF = f"{SMOLLM}/SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
N_LINES = 400


def shakespeare(assets) -> list[str]:
    return assets("data/tinyshakespeare.txt").read_text().splitlines()[:N_LINES]


# ---------------------------------------------------------------------------------------------------------------
# llama2.c stories260K
# ---------------------------------------------------------------------------------------------------------------
def published_sample(path) -> str:
    """The text of the `./run ... -t 0.0` block of expected_sample.md."""
    text = path.read_text()
    match = re.search(r"\$ \./run stories260K/stories260K\.bin -z stories260K/tok512\.bin -t 0\.0\n(.*?)\n```", text,
                      re.S)
    assert match, "expected_sample.md changed"
    return match.group(1)


def test_stories260k_greedy_sample_matches_published(assets, tmp_path, one_thread):
    from lora_lab.formats.llama2c import convert_llama2c

    folder = assets("models/stories260K")
    config = convert_llama2c(folder / "stories260K.bin", tmp_path / "ckpt", tokenizer_path=folder / "tok512.bin")
    assert (config.n_embd, config.intermediate_size, config.n_layer, config.n_head, config.n_query_groups,
            config.vocab_size, config.block_size, config.tie_embeddings) == (64, 172, 5, 8, 4, 512, 512, True)
    model = GPT.from_checkpoint(tmp_path / "ckpt").eval()
    tok = Tokenizer(tmp_path / "ckpt")
    expected = published_sample(folder / "expected_sample.md")
    ids = list(generate(model, torch.tensor([tok.bos_id]), max_new_tokens=255, temperature=0.0, eos_ids=tok.eos_ids))
    assert len(ids) >= 200
    text = tok.decode(ids[:200])
    assert len(text) > 400  # 200 tokens of a 512-token vocabulary: about half the sample
    assert expected.startswith(text), f"got:\n{text}\nexpected:\n{expected}"
    assert expected.startswith(tok.decode(ids))
    # and the tokenizer encodes the sample back into the same ids (up to where we cut it)
    assert tok.encode(text, bos=False).tolist() == ids[:200]


# ---------------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct GGUF
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm_gguf(tmp_path_factory):
    """The GGUF converted once per test session (it takes a while: 135M parameters to dequantize)."""
    from conftest import require_asset
    from lora_lab.formats.gguf_import import convert_gguf

    out = tmp_path_factory.mktemp("smollm2-gguf")
    convert_gguf(require_asset(GGUF), out)
    return out


@pytest.mark.slow
def test_smollm2_gguf_config(smollm_gguf, assets):
    hf = json.loads(assets(f"{SMOLLM}/config.json").read_text())
    config = load_config(smollm_gguf)
    assert (config.n_layer, config.n_embd, config.n_head, config.n_query_groups, config.head_size,
            config.intermediate_size, config.vocab_size, config.block_size) == (
        hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"],
        hf["head_dim"], hf["intermediate_size"], hf["vocab_size"], hf["max_position_embeddings"])
    assert config.rope_base == hf["rope_theta"] and config.norm_eps == pytest.approx(hf["rms_norm_eps"])
    assert config.tie_embeddings and config.prompt_style == "chatml"
    assert config.extra["gguf_file_type"] == "MOSTLY_Q4_1"
    # the tokenizer files next to the GGUF were copied
    assert (smollm_gguf / "tokenizer.json").read_bytes() == assets(f"{SMOLLM}/tokenizer.json").read_bytes()


@pytest.mark.slow
def test_smollm2_gguf_answers_the_capital_of_france(smollm_gguf, one_thread):
    model = GPT.from_checkpoint(smollm_gguf).eval()
    tok = Tokenizer(smollm_gguf)
    prompt = tok.encode(CHATML_PROMPT)
    assert prompt[0].item() == 1  # <|im_start|>, not an added BOS
    ids = list(generate(model, prompt, max_new_tokens=20, temperature=0.0, eos_ids=tok.eos_ids))
    answer = tok.decode(ids)
    assert answer.startswith("The capital of France is Paris."), answer


@pytest.mark.slow
def test_smollm2_gguf_logits_match_transformers(smollm_gguf, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM

    from lora_lab.formats.hf import export_hf

    export_hf(smollm_gguf, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    model = GPT.from_checkpoint(smollm_gguf).eval()
    idx = Tokenizer(smollm_gguf).encode(CHATML_PROMPT + "The capital of France is Paris.")[None]  # (1, T)
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert ours[0, -1].argmax() == theirs[0, -1].argmax()


# ---------------------------------------------------------------------------------------------------------------
# tokenizers against transformers / SentencePiece
# ---------------------------------------------------------------------------------------------------------------
def assert_same_ids(ours: Tokenizer, encode_ref, lines: list[str], **kw) -> None:
    """ids of every line and of all lines as one chunk; `encode_ref(text) -> list[int]`."""
    mismatches = [line for line in lines if ours.encode(line, **kw).tolist() != encode_ref(line)]
    assert not mismatches, f"{len(mismatches)} lines differ, e.g. {mismatches[:3]}"
    chunk = "\n".join(lines)
    assert ours.encode(chunk, **kw).tolist() == encode_ref(chunk)


def test_smollm2_tokenizer_matches_autotokenizer(assets):
    from transformers import AutoTokenizer

    folder = assets(SMOLLM)
    ours, ref = Tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    lines = shakespeare(assets)
    assert_same_ids(ours, lambda t: ref(t)["input_ids"], lines)
    ids = ours.encode("\n".join(lines[:50])).tolist()
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert (ours.bos_id, ours.eos_id) == (ref.bos_token_id, ref.eos_token_id)


@pytest.mark.slow
def test_smollm2_gguf_embedded_vocab_matches_autotokenizer(assets, tmp_path):
    """The tokenizer rebuilt from the GGUF's own vocabulary and merges (no tokenizer.json used)."""
    from transformers import AutoTokenizer

    from lora_lab.formats.gguf_import import write_gguf_tokenizer

    write_gguf_tokenizer(assets(GGUF), out_dir=tmp_path)
    ours, ref = Tokenizer(tmp_path), AutoTokenizer.from_pretrained(assets(SMOLLM))
    lines = shakespeare(assets) + [CHATML_PROMPT, "Digits 1234567 and  spaces\t\ttabs",
                                   "héllo wörld ☃ 日本語 🙂"]
    assert_same_ids(ours, lambda t: ref(t)["input_ids"], lines)
    ids = ref(lines[-1])["input_ids"]
    assert ours.decode(ids) == lines[-1]
    assert (ours.bos_id, ours.eos_ids) == (1, [2])
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"].startswith("{% for message")


LLAMA2_TOKENIZER_CONFIG = {  # as in meta-llama/Llama-2-7b-hf
    "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    "pad_token": None, "legacy": False, "tokenizer_class": "LlamaTokenizer", "clean_up_tokenization_spaces": False,
}


def test_llama2_tokenizer_model_matches_autotokenizer(assets, tmp_path):
    from transformers import AutoTokenizer, LlamaTokenizer

    shutil.copy(assets("tokenizers/llama2/tokenizer.model"), tmp_path / "tokenizer.model")
    lines = shakespeare(assets)
    # a bare folder: transformers' LlamaTokenizer adds no BOS there, ours (SentencePiece's default) does
    ours = Tokenizer(tmp_path)
    ref = LlamaTokenizer.from_pretrained(tmp_path)
    assert_same_ids(ours, lambda t: ref(t, add_special_tokens=False)["input_ids"], lines, bos=False)
    assert ours.encode("Hello").tolist() == [1, 15043]
    # with the Hugging Face repo's tokenizer_config.json both add BOS by default
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(LLAMA2_TOKENIZER_CONFIG))
    ours, ref = Tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert_same_ids(ours, lambda t: ref(t)["input_ids"], lines)
    ids = ours.encode("\n".join(lines[:50])).tolist()
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert (ours.bos_id, ours.eos_id) == (ref.bos_token_id, ref.eos_token_id) == (1, 2)


def test_llama2_tokenizer_bin_matches_sentencepiece(assets):
    """The tokenizer.json built from llama2.c's tokenizer.bin encodes like the SentencePiece model itself."""
    import sentencepiece as spm

    from lora_lab.formats.llama2c import llama2c_tokenizer

    ours, pieces = llama2c_tokenizer(assets("tokenizers/llama2/tokenizer.bin"))
    sp = spm.SentencePieceProcessor(model_file=str(assets("tokenizers/llama2/tokenizer.model")))
    assert len(pieces) == sp.vocab_size() == 32000
    lines = shakespeare(assets) + ["a  b    c\n\nd  ", "  x", " leading", "x" + " " * 20 + "y",
                                   "héllo ☃ 日本語 🙂"]
    bad = [line for line in lines if ours.encode(line, add_special_tokens=False).ids != sp.encode(line)]
    assert not bad, bad[:3]
    chunk = "\n".join(lines)
    assert ours.encode(chunk, add_special_tokens=False).ids == sp.encode(chunk)
    assert ours.encode("Hello").ids == [1, 15043]  # the post-processor adds BOS like SentencePiece models do
    assert ours.decode(sp.encode(chunk)) == sp.decode(sp.encode(chunk))
