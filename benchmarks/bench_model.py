"""Our GPT against transformers on the same config and weights, in one process: training step and generation speed.

    python benchmarks/bench_model.py                       # SmolLM2-135M config, random weights, CPU, float32
    python benchmarks/bench_model.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

Both models run the same work, interleaved, best of --repeats; ratios (ours / transformers, lower is better) are
what to read on a noisy machine, not absolute times. With --threads 1 the clock is the main thread's CPU time
(time.thread_time): time other processes take from a shared machine does not count, so the ratio holds under load.
  fwd+bwd:  forward, next-token cross-entropy and backward on a (batch, seq) batch of random tokens; two rows:
            - the same loss code on both sides: logits of every position, then F.cross_entropy (the models alone);
            - each library's own training loss (`model(x, labels=x)`): ours runs lm_head and the cross-entropy
              fused, chunk by chunk (lora_lab/model.py: next_token_loss), transformers computes all logits first.
            Both give the same loss (checked before timing).
  generate: greedy decoding of new_tokens tokens after a 16-token prompt, KV cache on both sides
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lora_lab import GPT
from lora_lab.flops import peak_flops_of, training_flops
from lora_lab.generate import generate

from bench_lora import SMOLLM2_CONFIG  # noqa: E402  (the shared assets, found as the tests find them)


def clock() -> float:
    """CPU time of this thread with one thread (immune to other processes' load), else wall time."""
    return time.thread_time() if torch.get_num_threads() == 1 else time.perf_counter()


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return min(times)


def load_pair(checkpoint_dir: str | None, tmp: Path):
    """(ours, transformers') models holding the same float32 weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from lora_lab.formats.hf import convert_hf_checkpoint, export_hf

    if checkpoint_dir is None:
        # SmolLM2-135M's architecture with random weights: converted by our real converter
        hf_cfg = json.loads(SMOLLM2_CONFIG.read_text()) if SMOLLM2_CONFIG.is_file() else dict(
            hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
            vocab_size=49152, tie_word_embeddings=True)
        hf_cfg = {k: v for k, v in hf_cfg.items() if k not in ("architectures", "torch_dtype", "model_type")}
        torch.manual_seed(0)
        hf = LlamaForCausalLM(LlamaConfig(**hf_cfg))
        hf.save_pretrained(tmp / "hf")
        convert_hf_checkpoint(tmp / "hf", tmp / "ours")
        checkpoint_dir = tmp / "ours"
    else:
        export_hf(checkpoint_dir, tmp / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32, attn_implementation="sdpa")
    ours = GPT.from_checkpoint(checkpoint_dir, dtype=torch.float32)
    return ours, hf


def main(checkpoint_dir: str | None = None, batch_size: int = 4, seq_len: int = 256, new_tokens: int = 128,
         repeats: int = 3, threads: int | None = None) -> None:
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf = load_pair(checkpoint_dir, Path(tmp))
    vocab = ours.config.vocab_size
    x = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))

    # transformers' loss code: labels shifted left (-100 at the end), cross-entropy over every position's logits
    shifted = F.pad(x[:, 1:], (0, 1), value=-100).reshape(-1)  # (B*T,)

    def ours_step():  # our model, transformers' way of computing the loss
        ours.zero_grad(set_to_none=True)
        logits = ours(x)  # (B, T, vocab)
        F.cross_entropy(logits.view(-1, vocab), shifted).backward()

    def ours_train_step():  # our training loss: lm_head + cross-entropy fused and chunked
        ours.zero_grad(set_to_none=True)
        ours(x, labels=x).backward()

    def hf_step():
        hf.zero_grad(set_to_none=True)
        hf(input_ids=x, labels=x).loss.backward()

    # the losses must agree, or we are not timing the same work
    ours.train(), hf.train()
    with torch.no_grad():
        a = F.cross_entropy(ours(x).view(-1, vocab), shifted)
        b = hf(input_ids=x, labels=x).loss
        c = ours(x, labels=x)
    assert torch.allclose(a, b, rtol=1e-4) and torch.allclose(c, b, rtol=1e-4), (a.item(), b.item(), c.item())

    rows = []
    ours_step(), ours_train_step(), hf_step()  # warm-up
    t_ours, t_train, t_hf = [], [], []
    for _ in range(repeats):  # interleave so machine noise hits both sides alike
        t_ours.append(best_of(ours_step, 1))
        t_train.append(best_of(ours_train_step, 1))
        t_hf.append(best_of(hf_step, 1))
    rows.append((f"fwd+bwd {batch_size}x{seq_len}, same CE (s)", min(t_ours), min(t_hf)))
    rows.append((f"fwd+bwd {batch_size}x{seq_len}, labels= (s)", min(t_train), min(t_hf)))
    # model FLOPs of the step (lora_lab/flops.py: every weight trains; lm_head on all positions, as both sides
    # here compute the logits of every position) over the CPU's measured matmul peak
    step_flops = training_flops(ours)(batch_size * seq_len, batch_size * seq_len,
                                      batch_size * seq_len * (seq_len + 1) // 2)
    peak, peak_source = peak_flops_of(x.device, torch.float32)
    mfu = (step_flops / min(t_ours) / peak, step_flops / min(t_train) / peak, step_flops / min(t_hf) / peak)

    ours.eval(), hf.eval()
    prompt = x[0, :16]

    def ours_gen():
        n = sum(1 for _ in generate(ours, prompt, new_tokens, temperature=0.0))
        assert n == new_tokens

    def hf_gen():
        out = hf.generate(prompt.view(1, -1), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long), pad_token_id=0)
        assert out.size(1) == prompt.numel() + new_tokens

    with torch.inference_mode():
        ours_gen(), hf_gen()
        g_ours, g_hf = [], []
        for _ in range(repeats):
            g_ours.append(best_of(ours_gen, 1))
            g_hf.append(best_of(hf_gen, 1))
    rows.append((f"generate {new_tokens} tokens (tok/s)", new_tokens / min(g_ours), new_tokens / min(g_hf)))

    name = ours.config.name or "model"
    print(f"\n{name}: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M params, float32, "
          f"{torch.get_num_threads()} threads, best of {repeats}"
          f"{' (CPU time of the thread)' if torch.get_num_threads() == 1 else ' (wall time)'}")
    print(f"| {'measure':<28} | {'lora_lab':>9} | {'transformers':>12} | {'ours/theirs time':>16} |")
    print(f"|{'-' * 30}|{'-' * 11}|{'-' * 14}|{'-' * 18}|")
    for label, o, h in rows:
        ratio = o / h if "(s)" in label else h / o  # always time ratio: < 1.0 means we are faster
        print(f"| {label:<28} | {o:>9.3f} | {h:>12.3f} | {ratio:>16.2f} |")
    print(f"fwd+bwd MFU: lora_lab {100 * mfu[0]:.1f}% (same CE), {100 * mfu[1]:.1f}% (labels=), "
          f"transformers {100 * mfu[2]:.1f}% "
          f"({step_flops / 1e9:.0f} GFLOP per step; {peak_source}: {peak / 1e9:.1f} GFLOP/s)")


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
