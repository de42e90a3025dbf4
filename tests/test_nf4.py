"""NF4 quantization: bit-identical with bitsandbytes (CPU), error bound, NF4Linear, model swap, serialization."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lora_lab import GPT, Config, LoraLabError
from lora_lab.nf4 import (NF4Linear, NF4State, dequantize_nf4, dynamic_map, model_size_report, nf4_levels,
                          quantize_model_nf4, quantize_nf4)

# The 16 NF4 values as published (QLoRA appendix E / bitsandbytes get_4bit_type("nf4")), float32
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _eager_bitsandbytes(monkeypatch):
    # bitsandbytes torch.compiles its odd-shape dequantization on first use (seconds per shape on CPU);
    # the eager path computes the same thing
    monkeypatch.setattr(torch._dynamo.config, "disable", True)


def bnb_functional():
    pytest.importorskip("bitsandbytes", minversion="0.50")
    import bitsandbytes.functional as BF

    return BF


def bnb_dequantize(q, s):
    """bitsandbytes' dequantization of (q, s).

    Its AVX-512 CPU kernel (0.50.2) finds a block's absmax as row * (row_length // blocksize) + column_block,
    which is wrong when a row is a multiple of 16 long but not a multiple of the block size (e.g. rows of 64 with
    blocks of 128): blocks run over the flattened tensor, as bitsandbytes' CUDA kernel and its own generic path
    (used on CPU for odd row lengths) compute them. In that case compare with the generic path."""
    BF = bnb_functional()
    row = s.shape[-1]
    if row % s.blocksize == 0 or row % 16 != 0:
        return BF.dequantize_4bit(q, s).reshape(s.shape)  # its CPU kernel returns a 1-d tensor as (1, n)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = s.absmax
    if s.nested:
        absmax = BF.dequantize_blockwise(s.absmax, s.state2) + s.offset
    return _dequantize_4bit_compute(q.view(-1), absmax, s.code, s.blocksize, s.shape, s.dtype)


def assert_same_as_bnb(x, blocksize, double_quant):
    BF = bnb_functional()
    q_ref, s_ref = BF.quantize_4bit(x, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    packed, state = quantize_nf4(x, blocksize=blocksize, double_quant=double_quant)
    assert packed.dtype == torch.uint8 and packed.shape == q_ref.shape
    assert torch.equal(packed, q_ref)
    assert torch.equal(state.absmax, s_ref.absmax)  # float32 absmax, or the uint8 codes of it
    assert state.double_quant == double_quant
    if double_quant:
        assert torch.equal(state.nested_absmax, s_ref.state2.absmax)
        assert torch.equal(state.offset, s_ref.offset)
        assert torch.equal(state.nested_code, s_ref.state2.code)
    out, out_ref = dequantize_nf4(packed, state), bnb_dequantize(q_ref, s_ref)
    assert out.dtype == out_ref.dtype == x.dtype and out.shape == x.shape
    assert torch.equal(out, out_ref)
    return packed, state


# ---- the code books --------------------------------------------------------------------------------------------
def test_levels_are_the_published_table():
    levels = nf4_levels()
    assert levels.dtype == torch.float32
    assert torch.equal(levels, torch.tensor(PUBLISHED_NF4, dtype=torch.float32))


def test_dynamic_map_matches_bitsandbytes():
    code = dynamic_map()
    assert code.shape == (256,) and bool((code[1:] > code[:-1]).all())  # strictly ascending
    assert code[-1] == 1.0 and (code == 0).sum() == 1
    BF = bnb_functional()
    assert torch.equal(code, BF.create_dynamic_map(signed=True))


# ---- bit-identical with bitsandbytes -----------------------------------------------------------------------------
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("shape", [(37, 53), (128, 64), (7,)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_identical_with_bitsandbytes(dtype, shape, blocksize, double_quant):
    x = (torch.randn(shape) * 0.05).to(dtype)
    assert_same_as_bnb(x, blocksize, double_quant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_double_quant_many_nested_blocks(dtype):
    # 8192 absmax values = 32 nested blocks: exercises the 8-bit grid lookup on thousands of values
    x = (torch.randn(512, 1024) * torch.rand(512, 1)).to(dtype)
    packed, state = assert_same_as_bnb(x, 64, True)
    assert state.nested_absmax.shape == (32,) and state.absmax.dtype == torch.uint8


def test_exact_ties_go_to_the_lower_level():
    levels = nf4_levels()
    midpoints = (levels[:-1] + levels[1:]) / 2  # (15,)
    for absmax in (1.0, 2.0, 0.5):  # powers of two: value / absmax is exactly the midpoint
        x = torch.zeros(64)
        x[0] = absmax
        x[1:16] = midpoints * absmax
        x[16:31] = -midpoints * absmax
        packed, state = assert_same_as_bnb(x, 64, False)
        codes = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], 1).view(-1).long()
        assert codes[0] == 15
        assert codes[1:16].tolist() == list(range(15))  # midpoint i lies between level i and i+1 -> i
        neg = torch.bucketize(-midpoints, midpoints)  # same rule for the negated values
        assert codes[16:31].tolist() == neg.tolist()


def test_partial_last_block_is_divided_by_its_absmax():
    # bitsandbytes scales full blocks by x * (1 / absmax) but the partial last block by x / absmax; the two round
    # differently, and for these values on opposite sides of a level midpoint
    a, v = 1.4925131797790527, -1.2657949924468994  # v / a and v * (1 / a) straddle the midpoint of levels 0, 1
    x = torch.full((130,), 0.01)
    x[0], x[1] = a, v  # a full block with this pair
    x[128], x[129] = a, v  # and the partial last block of 2 elements
    packed, state = assert_same_as_bnb(x, 64, False)
    bytes_ = packed.view(-1)
    assert bytes_[0] >> 4 == bytes_[64] >> 4 == 15  # a itself: level 1.0
    assert bytes_[0] & 15 == 1 and bytes_[64] & 15 == 0  # v: full block rounds up, partial block down


def test_zero_blocks():
    x = torch.randn(5, 40)  # 200 elements: 3 full blocks of 64 and a partial one of 8
    x.view(-1)[64:128] = 0  # an all-zero full block
    x.view(-1)[192:] = 0  # an all-zero partial block
    packed, state = assert_same_as_bnb(x, 64, False)
    assert state.absmax[1] == 0 and state.absmax[3] == 1e-38  # bitsandbytes clamps only the partial block
    out = dequantize_nf4(packed, state)
    assert torch.equal(out.view(-1)[64:128], torch.zeros(64)) and torch.equal(out.view(-1)[192:], torch.zeros(8))
    # an all-zero tensor under double quantization: offset 0, every nested block all zero
    packed, state = assert_same_as_bnb(torch.zeros(300, 100), 64, True)
    assert torch.equal(dequantize_nf4(packed, state), torch.zeros(300, 100))


# ---- format properties -------------------------------------------------------------------------------------------
def test_nearest_level_search_equals_bucketize():
    from lora_lab.nf4 import _nearest_level

    levels = nf4_levels()
    mid = (levels[:-1] + levels[1:]) / 2
    edges = torch.linspace(-1, 1, 1025)  # the cell boundaries of the search, and their float neighbours
    x = torch.cat([mid, levels, edges, torch.rand(200_000) * 2 - 1, torch.tensor([-0.0, 1e-30, -1e-30])])
    x = torch.cat([x, x.nextafter(torch.tensor(2.0)), x.nextafter(torch.tensor(-2.0))]).clamp(-1, 1)
    expected = torch.bucketize(x, mid)
    got = _nearest_level(x)
    assert got.dtype == torch.uint8
    assert torch.equal(got.long(), expected)
    assert torch.equal(_nearest_level(mid).long(), torch.arange(15))  # exact midpoints: the lower level


def test_packing_layout():
    x = torch.tensor([1.0, -1.0, 0.0])  # levels 15, 0, 7; odd count: padded with the code of 0.0
    packed, state = quantize_nf4(x, blocksize=64, double_quant=False)
    assert packed.shape == (2, 1)
    assert packed.view(-1).tolist() == [15 << 4 | 0, 7 << 4 | 7]
    assert state.absmax.tolist() == [1.0]


@pytest.mark.parametrize("blocksize", [64, 128])
def test_error_bound(blocksize):
    x = torch.randn(61, 67) * torch.rand(61, 1) * 3  # rows of different scales, partial last block
    packed, state = quantize_nf4(x, blocksize=blocksize, double_quant=False)
    err = (x - dequantize_nf4(packed, state)).abs().view(-1)
    levels = nf4_levels()
    half_gap = (levels[1:] - levels[:-1]).max() / 2
    n = x.numel()
    block_absmax = F.pad(x.view(-1).abs(), (0, state.n_blocks * blocksize - n)).view(-1, blocksize).amax(1)
    bound = (half_gap * block_absmax).repeat_interleave(blocksize)[:n]
    assert bool((err <= bound * (1 + 1e-6)).all())
    assert float(err.max()) > 0.5 * float(bound.max())  # the bound is not vacuous


def test_bits_per_parameter():
    for double_quant, expected in [(True, 4 + 8 / 64 + 32 / (64 * 256)), (False, 4.5)]:
        model = nn.Sequential(NF4Linear.from_linear(nn.Linear(1024, 256, bias=False), 64, double_quant))
        report = model_size_report(model)
        n = 1024 * 256
        assert report["quantized_params"] == n and report["quantized_layers"] == 1
        offset_bits = 32 / n if double_quant else 0  # one float32 mean per tensor
        assert report["bits_per_quantized_param"] == pytest.approx(expected + offset_bits, rel=1e-12)
        assert round(report["bits_per_quantized_param"], 3) == (4.127 if double_quant else 4.5)
        assert report["unquantized_bytes"] == 4 * n


# ---- NF4Linear --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4linear_forward_and_input_grad(dtype):
    linear = nn.Linear(96, 40).to(dtype)
    layer = NF4Linear.from_linear(linear, blocksize=64)
    x = torch.randn(3, 5, 96, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x)
    w = layer.dequantize(dtype)
    y_ref = F.linear(x_ref, w, linear.bias.detach())
    assert y.dtype == dtype and y.shape == (3, 5, 40)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert not any(p.requires_grad for p in layer.parameters())
    assert layer.weight.grad is None and layer.bias.grad is None
    assert 0 < (w.float() - linear.weight.float()).abs().max() < 0.1  # quantized, but close


def test_nf4linear_compute_dtype_follows_input():
    layer = NF4Linear.from_linear(nn.Linear(64, 32), blocksize=64)  # quantized from float32
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.linear(x, layer.dequantize(torch.bfloat16), layer.bias.to(torch.bfloat16)))


def test_backward_saves_no_full_precision_weight():
    layer = NF4Linear.from_linear(nn.Linear(128, 64, bias=False))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(2, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert not any(t.is_floating_point() and t.numel() >= 128 * 64 for t in saved)
    y.sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantize().sum(0).expand(2, 128))
    # the same check sees the weight a plain F.linear keeps
    saved.clear()
    w = layer.dequantize().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.linear(x, w)
    assert any(t.numel() == 128 * 64 for t in saved)


def test_nf4linear_bias_gradient_when_unfrozen():
    layer = NF4Linear.from_linear(nn.Linear(64, 16))
    layer.bias.requires_grad_(True)
    x = torch.randn(3, 64)
    layer(x).pow(2).sum().backward()
    bias = layer.bias.detach().clone().requires_grad_(True)
    F.linear(x, layer.dequantize(), bias).pow(2).sum().backward()
    torch.testing.assert_close(layer.bias.grad, bias.grad)


def test_compile_hook_traces_without_graph_breaks(monkeypatch):
    # on CUDA, forward and backward run torch.compile'd dequantize + matmul; check on CPU, with a backend that
    # needs no compiler, that both trace as one graph each and compute exactly what the eager path does
    import lora_lab.nf4 as nf4

    monkeypatch.setattr(torch._dynamo.config, "disable", False)
    compiled = {}

    def always_compiled(fn, x):
        if fn not in compiled:
            compiled[fn] = torch.compile(fn, backend="aot_eager", dynamic=True, fullgraph=True)
        return compiled[fn]

    layer = NF4Linear.from_linear(nn.Linear(96, 40))
    x = torch.randn(2, 7, 96, requires_grad=True)
    layer(x).pow(2).sum().backward()
    eager_y, eager_grad = layer(x).detach(), x.grad.clone()
    x.grad = None
    monkeypatch.setattr(nf4, "_maybe_compiled", always_compiled)
    y = layer(x)
    y.pow(2).sum().backward()
    assert len(compiled) == 2  # forward and backward both went through the hook
    assert torch.equal(y.detach(), eager_y) and torch.equal(x.grad, eager_grad)


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_round_trip(tmp_path, double_quant):
    layer = NF4Linear.from_linear(nn.Linear(70, 30).to(torch.bfloat16), blocksize=128, double_quant=double_quant)
    sd = layer.state_dict()
    expected = {"weight", "weight_absmax", "weight_code", "bias"}
    if double_quant:
        expected |= {"weight_nested_absmax", "weight_offset", "weight_nested_code"}
    assert set(sd) == expected
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "nf4.safetensors")
    fresh = NF4Linear(70, 30, bias=True, blocksize=128, double_quant=double_quant, dtype=torch.bfloat16)
    fresh.load_state_dict(load_file(tmp_path / "nf4.safetensors"))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.randn(2, 70, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh.dequantize(), layer.dequantize())


def test_model_dtype_cast_keeps_statistics_float32():
    layer = NF4Linear.from_linear(nn.Linear(64, 64))
    before = layer.dequantize()
    layer.to(torch.bfloat16)
    assert layer.weight_nested_absmax.dtype == torch.float32 and layer.weight_offset.dtype == torch.float32
    assert layer.weight_code.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dequantize(), before)


def test_state_is_a_view_of_the_buffers():
    layer = NF4Linear.from_linear(nn.Linear(64, 8))
    state = layer.quant_state
    assert isinstance(state, NF4State) and state.shape == (8, 64) and state.blocksize == 64
    assert state.nested_absmax is layer.weight_nested_absmax and state.absmax is layer.weight_absmax
    assert set(state.tensors()) == {"absmax", "code", "nested_absmax", "offset", "nested_code"}


# ---- models -------------------------------------------------------------------------------------------------
def tiny_config(**kw):
    return Config(name="tiny", block_size=32, vocab_size=96, n_layer=2, n_embd=64, n_head=4, n_query_groups=2,
                  intermediate_size=160, **kw)


@pytest.mark.parametrize("tie", [False, True])
def test_quantize_model_swaps_linear_layers(tie):
    config = tiny_config(tie_embeddings=tie)
    model = GPT(config).eval()
    reference = GPT(config).eval()
    reference.load_state_dict(model.state_dict())
    idx = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        logits_float = model(idx)
    assert quantize_nf4(model) is model  # module dispatch: swaps in place
    names = {name for name, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert names == {f"blocks.{i}.{p}" for i in range(2) for p in
                     ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert type(model.lm_head) is nn.Linear and type(model.wte) is nn.Embedding
    if tie:
        assert model.lm_head.weight is model.wte.weight
    # exactly the float model with each weight replaced by its dequantized value
    for name in names:
        reference.get_submodule(name).weight.data = model.get_submodule(name).dequantize()
    with torch.no_grad():
        logits = model(idx)
        torch.testing.assert_close(logits, reference(idx))
    # and close to the unquantized model
    rel = (logits - logits_float).norm() / logits_float.norm()
    assert 0 < rel < 0.15
    report = model_size_report(model)
    assert report["quantized_layers"] == 14
    assert report["total_bytes"] < report["unquantized_bytes"]


def test_quantize_model_skip_patterns_and_options():
    model = GPT(tiny_config())
    quantize_model_nf4(model, blocksize=128, double_quant=False, skip=("lm_head", "blocks.1.*", "o_proj"))
    quantized = {name for name, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert quantized == {f"blocks.0.{p}" for p in ("attn.q_proj", "attn.k_proj", "attn.v_proj",
                                                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    layer = model.blocks[0].attn.q_proj
    assert layer.blocksize == 128 and not layer.double_quant
    model2 = GPT(tiny_config())
    quantize_model_nf4(model2, skip=())
    assert isinstance(model2.lm_head, NF4Linear)
    tied = GPT(tiny_config(tie_embeddings=True))
    quantize_model_nf4(tied, skip=())  # a tied lm_head shares the (float) embedding: never quantized
    assert type(tied.lm_head) is nn.Linear and tied.lm_head.weight is tied.wte.weight
    assert isinstance(tied.blocks[0].mlp.up_proj, NF4Linear)


def test_quantized_model_checkpoint_loads_into_meta_model(tmp_path):
    config = tiny_config()
    model = quantize_nf4(GPT(config).eval())
    # no tensors shared between layers (safetensors refuses those), so the state dict saves as it is
    save_file(model.state_dict(), tmp_path / "q.safetensors")
    with torch.device("meta"):
        shell = GPT(config)
    quantize_nf4(shell)  # empty NF4 shells on the meta device, nothing computed
    shell.load_weights(load_file(tmp_path / "q.safetensors"))
    shell.eval()
    idx = torch.randint(0, config.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(shell(idx), model(idx))


# ---- bitsandbytes serialization ------------------------------------------------------------------------------------
@pytest.mark.parametrize("double_quant", [True, False])
def test_bitsandbytes_state_dict_round_trip(double_quant):
    pytest.importorskip("bitsandbytes", minversion="0.50")
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    linear = nn.Linear(128, 40)  # rows a multiple of the block: see bnb_dequantize
    ref = bnb.nn.Linear4bit(128, 40, bias=True, compress_statistics=double_quant, quant_type="nf4",
                            compute_dtype=torch.float32)
    ref.load_state_dict(linear.state_dict())
    ref = ref.to("cpu")  # quantizes the weight
    ref_sd = ref.state_dict()

    ours = NF4Linear.from_linear(linear, blocksize=64, double_quant=double_quant)
    exported = ours.to_bnb_state_dict()
    assert list(exported) == list(ref_sd)
    for k in ref_sd:
        assert torch.equal(exported[k], ref_sd[k]), k
    meta = json.loads(bytes(exported["weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["quant_type"] == "nf4" and meta["shape"] == [40, 128]

    # import what bitsandbytes wrote; identical forward
    imported = NF4Linear.from_bnb_state_dict({"layer." + k: v for k, v in ref_sd.items()}, prefix="layer.")
    x = torch.randn(4, 128)
    with torch.no_grad():
        assert torch.equal(imported(x), ref(x))
    assert torch.equal(imported.dequantize(), BF.dequantize_4bit(ref.weight.data, ref.weight.quant_state))

    # and bitsandbytes reads what we wrote
    stats = {k[len("weight."):]: v for k, v in exported.items() if k.startswith("weight.")}
    param = bnb.nn.Params4bit.from_prequantized(data=exported["weight"], quantized_stats=stats, device="cpu")
    assert torch.equal(BF.dequantize_4bit(param.data, param.quant_state), ours.dequantize())


def test_bnb_import_errors():
    ours = NF4Linear.from_linear(nn.Linear(64, 8)).to_bnb_state_dict()
    with pytest.raises(LoraLabError, match="missing"):
        NF4Linear.from_bnb_state_dict(ours, prefix="model.")
    fp4 = dict(ours)
    fp4["weight.quant_state.bitsandbytes__fp4"] = fp4.pop("weight.quant_state.bitsandbytes__nf4")
    with pytest.raises(LoraLabError, match="FP4"):
        NF4Linear.from_bnb_state_dict(fp4)
    with pytest.raises(LoraLabError, match="blocksize 16"):
        NF4Linear.from_linear(nn.Linear(64, 8), blocksize=16).to_bnb_state_dict()


def test_bad_inputs():
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        quantize_nf4(torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.ones(4), blocksize=0)
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.ones(4), blocksize=63)
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_nf4(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="does not fit"):
        NF4Linear(8, 4).quantize(torch.ones(8, 4))
