import os
import subprocess
import sys

import pytest
import torch

from lora_lab.checkpoint import save_checkpoint
from lora_lab.config import Config
from lora_lab.generate import StreamDecoder, generate, generation_stats, peak_memory_bytes, sample, select_dtype, \
    top_p_filter
from lora_lab.model import GPT
from lora_lab.tokenizer import Tokenizer
from lora_lab.utils import LoraLabError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GQA = dict(n_layer=2, n_embd=32, n_head=4, n_query_groups=2, vocab_size=64, block_size=64)
NEOX = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=64, block_size=64, rotary_percentage=0.25,
            parallel_residual=True, norm_class="LayerNorm", mlp_class="gelu", bias=True)


def tiny_model(**kw) -> GPT:
    torch.manual_seed(0)
    model = GPT(Config(**kw)).eval()
    with torch.no_grad():  # larger weights than the default init: logits far apart, no near-ties in argmax
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


PROMPT = torch.tensor([3, 17, 42, 5, 9])


@pytest.mark.parametrize("kw", [GQA, NEOX], ids=["gqa", "partial-rotary-parallel-residual"])
def test_kv_cache_matches_uncached_greedy(kw):
    model = tiny_model(**kw)
    cached = list(generate(model, PROMPT, max_new_tokens=30, temperature=0.0))
    uncached = list(generate(model, PROMPT, max_new_tokens=30, temperature=0.0, use_kv_cache=False))
    assert len(cached) == 30
    assert cached == uncached
    assert len(set(cached)) > 3  # a real sequence, not one token repeated
    # the cache is removed afterwards
    assert all(block.attn.kv_cache is None for block in model.blocks)


def test_kv_cache_logits_match_full_forward():
    model = tiny_model(**GQA)
    seq = torch.randint(0, 64, (1, 12))
    full = model(seq)  # (1, 12, vocab)
    model.set_kv_cache(batch_size=1, max_seq_length=12)
    with torch.no_grad():
        steps = [model(seq[:, :5], input_pos=0)]
        for pos in range(5, 12):
            steps.append(model(seq[:, pos:pos + 1], input_pos=pos))
    model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_sampling_is_reproducible_with_a_seed():
    model = tiny_model(**GQA)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return list(generate(model, PROMPT, max_new_tokens=20, temperature=1.5, top_k=40, generator=g))

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_top_k_1_equals_greedy():
    model = tiny_model(**GQA)
    greedy = list(generate(model, PROMPT, max_new_tokens=15, temperature=0.0))
    g = torch.Generator().manual_seed(0)
    top1 = list(generate(model, PROMPT, max_new_tokens=15, temperature=1.0, top_k=1, generator=g))
    assert top1 == greedy


def test_top_p_keeps_the_right_set():
    # probabilities 0.1, 0.5, 0.15, 0.25 (deliberately not sorted, to check the unsorting)
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25]])
    logits = probs.log()
    for top_p, kept in [(0.45, {1}), (0.7, {1, 3}), (0.8, {1, 3, 2}), (0.95, {0, 1, 2, 3})]:
        filtered = top_p_filter(logits, top_p)
        assert set(torch.isfinite(filtered[0]).nonzero().flatten().tolist()) == kept, top_p
        # kept tokens keep their logits
        torch.testing.assert_close(filtered[0, sorted(kept)], logits[0, sorted(kept)])
        # and sampling only ever draws from the kept set
        g = torch.Generator().manual_seed(0)
        draws = set(sample(logits.expand(2000, -1), temperature=1.0, top_p=top_p, generator=g).tolist())
        assert draws == kept, top_p


def test_sample_greedy_and_top_k():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 1.0, 0.0]])
    assert sample(logits, temperature=0.0).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    draws = sample(torch.tensor([[0.0, 3.0, 1.0, 2.0]]).expand(1000, -1), temperature=5.0, top_k=2, generator=g)
    assert set(draws.tolist()) == {1, 3}


def test_stops_at_eos_and_at_max_new_tokens():
    model = tiny_model(**GQA)
    greedy = list(generate(model, PROMPT, max_new_tokens=12, temperature=0.0))
    assert len(greedy) == 12
    eos = greedy[4]
    first = greedy.index(eos)  # the first time the "EOS" id appears
    stopped = list(generate(model, PROMPT, max_new_tokens=12, temperature=0.0, eos_ids=[eos]))
    assert stopped == greedy[: first + 1]  # EOS is yielded, then generation ends
    assert list(generate(model, PROMPT, max_new_tokens=3, temperature=0.0)) == greedy[:3]
    # the block size caps generation too
    long_prompt = torch.randint(0, 64, (60,))
    assert len(list(generate(model, long_prompt, max_new_tokens=50))) == 64 - 60


STREAM_TEXTS = [
    "Hello world, this is a test.",
    "  two leading spaces and\nnewlines\n\n  indented",
    "Unicode: café, naïve, 東京, emoji 😀🚀 and ∑ math.",
    "Mixed🙂text😀without spaces",
]


def _stream(tokenizer, ids, context_ids=()):
    stream = StreamDecoder(tokenizer, context_ids=context_ids)
    chunks = [stream.add(i) for i in ids]
    return chunks, stream.flush()


@pytest.mark.parametrize("tokenizer_dir", ["tokenizers/llama2", "models/smollm2-135m-instruct"],
                         ids=["sentencepiece", "byte-level-bpe"])
def test_stream_decode_equals_full_decode(assets, tokenizer_dir):
    tokenizer = Tokenizer(assets(tokenizer_dir))
    for text in STREAM_TEXTS:
        ids = tokenizer.encode(text, bos=False).tolist()
        chunks, rest = _stream(tokenizer, ids)
        assert "".join(chunks) + rest == tokenizer.decode(ids)
        assert all("\ufffd" not in c for c in chunks)  # half a character is never printed
        assert rest == ""
    # each emoji is several byte tokens in Llama 2's vocabulary: nothing is printed before the last byte
    if tokenizer.backend == "sentencepiece":
        ids = tokenizer.encode("😀", bos=False).tolist()
        assert len(ids) > 2
        chunks, _ = _stream(tokenizer, ids)
        assert chunks[:-1] == [""] * (len(ids) - 1) and chunks[-1] == "😀"


def test_stream_decode_keeps_the_space_after_the_prompt(assets):
    tokenizer = Tokenizer(assets("tokenizers/llama2"))
    prompt = tokenizer.encode("Once upon a time", bos=True).tolist()
    full = tokenizer.encode("Once upon a time there was a cat", bos=True).tolist()
    assert full[: len(prompt)] == prompt
    generated = full[len(prompt):]
    assert tokenizer.decode(generated) == "there was a cat"  # SentencePiece drops the leading space alone
    chunks, rest = _stream(tokenizer, generated, context_ids=prompt[-1:])
    assert "".join(chunks) + rest == " there was a cat"


def test_stream_flush_prints_an_incomplete_character(assets):
    tokenizer = Tokenizer(assets("tokenizers/llama2"))
    ids = tokenizer.encode("ab😀", bos=False).tolist()
    chunks, rest = _stream(tokenizer, ids[:-1])  # the emoji's last byte never comes
    assert "".join(chunks) == "ab"
    assert rest == tokenizer.decode(ids[:-1])[2:] and "\ufffd" in rest


def test_precision_and_stats():
    assert select_dtype(None, "cpu") == torch.float32
    assert select_dtype("bf16-true", "cpu") == torch.bfloat16
    assert select_dtype("float16", "cpu") == torch.float16
    with pytest.raises(LoraLabError, match="Unknown precision 'bf17'"):
        select_dtype("bf17", "cpu")
    assert peak_memory_bytes("cpu") > 10 * 2**20  # this process holds at least torch
    line = generation_stats(50, 2.0, "cpu")
    assert line.startswith("50 tokens in 2.00 s: 25.00 tokens/s; peak RSS ")


_PEAK_AFTER_RESET = """
import torch
from lora_lab.generate import peak_memory_bytes, reset_peak_memory

big = torch.ones(300 * 2**20 // 4)  # 300 MiB, every page written
del big
with_big = peak_memory_bytes("cpu")
reset_peak_memory("cpu")
after_reset = peak_memory_bytes("cpu")
small = torch.ones(100 * 2**20 // 4)  # a new peak of about +100 MiB
print(with_big, after_reset, peak_memory_bytes("cpu"))
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_cpu_peak_memory_counts_from_the_last_reset():
    """What the finetune scripts report on CPU: the peak since reset_peak_memory, not since the process started
    (QLoRA loads the float model before quantizing it; that must not count as training's memory).
    In a fresh process: in this long-lived one, malloc may hand `small` pages it already holds (a freed hole in its
    heap), and then the resident size rightly does not grow."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _PEAK_AFTER_RESET], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    with_big, after_reset, with_small = map(int, out.stdout.split())
    assert after_reset < with_big - 200 * 2**20  # the 300 MiB, freed, no longer counts
    assert with_small > after_reset + 80 * 2**20  # a new peak after the reset is seen


# ------------------------------------------------------------------------------------------------------------
# generate/base.py end to end
# ------------------------------------------------------------------------------------------------------------
def _run_script(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "generate", "base.py"), *args], capture_output=True,
                          text=True, env=env, timeout=120, cwd=cwd)


@pytest.fixture
def tiny_checkpoint(assets, tmp_path):
    """A random model with SmolLM2's tokenizer (vocab 49152)."""
    torch.manual_seed(0)
    config = Config(name="tiny-smollm2", n_layer=2, n_embd=32, n_head=4, n_query_groups=2, vocab_size=49152,
                    block_size=128, prompt_style="chatml")
    save_checkpoint(tmp_path / "ckpt", config, GPT(config).state_dict(),
                    tokenizer_dir=assets("models/smollm2-135m-instruct"))
    return tmp_path / "ckpt"


def test_generate_script_end_to_end(tiny_checkpoint):
    args = ["--checkpoint_dir", str(tiny_checkpoint), "--prompt", "Hello", "--max_new_tokens", "12",
            "--temperature", "0"]
    result = _run_script(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()  # generated text
    assert "tokens/s" in result.stderr and "peak RSS" in result.stderr and "Traceback" not in result.stderr

    # greedy: the printed text is exactly what generate() produces for the ChatML-wrapped prompt
    from lora_lab.prompts import PromptStyle

    model = GPT.from_checkpoint(tiny_checkpoint)
    tokenizer = Tokenizer(tiny_checkpoint)
    style = PromptStyle.from_checkpoint(tiny_checkpoint)
    assert style.name == "chatml"
    prompt_ids = tokenizer.encode(style.apply("Hello"))
    stop = tokenizer.eos_ids + style.stop_tokens(tokenizer)
    ids = [i for i in generate(model, prompt_ids, 12, eos_ids=stop) if i not in stop]
    expected = tokenizer.decode(prompt_ids[-1:].tolist() + ids)[len(tokenizer.decode(prompt_ids[-1:])):]
    assert result.stdout == expected + "\n"

    # --prompt_style plain feeds the text as it is: a different prompt, so (here) a different answer
    plain_ids = tokenizer.encode("Hello")
    ids = [i for i in generate(model, plain_ids, 12, eos_ids=stop) if i not in stop]
    plain = _run_script(*args, "--prompt_style", "plain")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == tokenizer.decode(plain_ids.tolist() + ids)[len(tokenizer.decode(plain_ids)):] + "\n"


def test_generate_script_missing_checkpoint_is_one_line(tmp_path):
    # (a missing *default* checkpoint is fetched instead: tests/test_default_checkpoint.py)
    result = _run_script("--checkpoint_dir", str(tmp_path / "nope"), "--prompt", "hi", cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "does not exist" in lines[0], result.stderr
    assert "lora_lab.download" in lines[0]
