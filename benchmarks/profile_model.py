"""Where a training step's time goes, operator by operator: our GPT against transformers, in CPU time.

    python benchmarks/profile_model.py --n_layer 6            # SmolLM2-135M width, 6 layers, 4 x 256, one thread

Every aten call of one forward + loss + backward is timed in the calling thread's CPU time (a TorchDispatchMode
around each call), best of --repeats steps per (operator, input shapes); the steps of the two models alternate.
One thread and CPU time make the comparison hold on a shared machine, where wall-clock profiles mostly show the
load. --loss labels uses each library's own training loss (`model(x, labels=x)`); --loss same computes ours the way
transformers does (all logits, shifted labels, F.cross_entropy). Prints the totals, the operators whose time
differs most and the (operator, shapes) rows behind them.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import load_pair  # noqa: E402


class OpTimer(TorchDispatchMode):
    """CPU time of every aten call, summed per (operator, input shapes)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds, self.calls = collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.thread_time()
        out = func(*args, **(kwargs or {}))
        key = (func.overloadpacket.__name__, tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))
        self.seconds[key] += time.thread_time() - t0
        self.calls[key] += 1
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n_layer", type=int, default=6, help="keep the first n layers of both models")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--loss", choices=["labels", "same"], default="labels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf = load_pair(None, Path(tmp))
    ours.blocks = ours.blocks[:args.n_layer]
    hf.model.layers = hf.model.layers[:args.n_layer]
    vocab = ours.config.vocab_size
    x = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    shifted = F.pad(x[:, 1:], (0, 1), value=-100).reshape(-1)

    def ours_step():
        ours.zero_grad(set_to_none=True)
        if args.loss == "labels":
            ours(x, labels=x).backward()
        else:
            F.cross_entropy(ours(x).view(-1, vocab), shifted).backward()

    def hf_step():
        hf.zero_grad(set_to_none=True)
        hf(input_ids=x, labels=x).loss.backward()

    ours_step(), hf_step()  # warm-up
    timers = {"ours": [], "hf": []}
    for _ in range(args.repeats):
        for side, step in (("ours", ours_step), ("hf", hf_step)):
            with OpTimer() as timer:
                step()
            timers[side].append(timer)

    def best(side):  # per (operator, shapes): the best of the steps
        keys = set().union(*(t.seconds for t in timers[side]))
        return {k: min(t.seconds.get(k, 0.0) for t in timers[side]) for k in keys}, timers[side][0].calls

    (a, a_calls), (b, b_calls) = best("ours"), best("hf")
    print(f"{args.n_layer} layers, {args.batch_size} x {args.seq_len}, loss {args.loss}: CPU time ours "
          f"{sum(a.values()):.3f} s, transformers {sum(b.values()):.3f} s (ours / theirs "
          f"{sum(a.values()) / sum(b.values()):.2f})")
    by_op = collections.defaultdict(lambda: [0.0, 0.0, 0, 0])
    for times, calls, i in ((a, a_calls, 0), (b, b_calls, 1)):
        for k, s in times.items():
            by_op[k[0]][i] += s
            by_op[k[0]][2 + i] += calls[k]
    print("\n| operator | ours s (calls) | transformers s (calls) | difference s |\n| --- | --- | --- | --- |")
    for op, (ta, tb, na, nb) in sorted(by_op.items(), key=lambda kv: -abs(kv[1][0] - kv[1][1]))[:args.top]:
        print(f"| {op} | {ta:.3f} ({na}) | {tb:.3f} ({nb}) | {ta - tb:+.3f} |")
    print("\n| operator | input shapes | ours s (calls) | transformers s (calls) |\n| --- | --- | --- | --- |")
    for k in sorted(set(a) | set(b), key=lambda k: -abs(a.get(k, 0.0) - b.get(k, 0.0)))[:args.top]:
        print(f"| {k[0]} | {k[1]} | {a.get(k, 0.0):.3f} ({a_calls.get(k, 0)}) | {b.get(k, 0.0):.3f} ({b_calls.get(k, 0)}) |")


if __name__ == "__main__":
    main()
