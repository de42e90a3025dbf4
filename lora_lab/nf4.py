"""NF4 (4-bit NormalFloat) quantization of linear weights, as in QLoRA, bit for bit the format of bitsandbytes.

The format
----------
Levels. NF4 has 16 levels in [-1, 1]: quantiles of the standard normal N(0, 1), scaled so the largest is 1, with
an exact zero. The halves are asymmetric so that zero is a level and all 16 codes are used: 8 positive quantiles
at the probabilities linspace(0.9677083, 0.5, 9)[:-1], 7 negative ones at linspace(0.9677083, 0.5, 8)[:-1]
(negated), plus 0; then everything is divided by the largest (QLoRA paper, appendix; bitsandbytes'
`create_normal_map`). The offset 0.9677083 keeps the outermost quantile finite. `nf4_levels()` derives them:

    -1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
     0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0

Blocks. The tensor is flattened (row-major) and cut into blocks of `blocksize` consecutive elements (64 by
default); a partial last block gets its own statistics. Each block keeps its absmax (float32). Every element is
scaled by 1/absmax, clamped to [-1, 1] and rounded to the nearest level; a value exactly halfway between two
levels goes to the lower one (a bucketize on the 15 midpoints, like bitsandbytes' CPU path). Two details of
bitsandbytes are kept so the bytes match: the partial last block is divided by its absmax (full blocks are
multiplied by 1/absmax, which rounds differently), and its stored absmax is clamped to 1e-38 (an all-zero full
block stores 0).

Layout. Two 4-bit codes per byte, the first element in the high nibble: byte k = code[2k] << 4 | code[2k + 1].
An odd element count is padded with the code of 0.0 (7). The packed tensor has shape (ceil(numel / 2), 1),
the shape bitsandbytes uses, so packed weights move between the two libraries unchanged.

Double quantization. The absmax values themselves cost 32 bits per block = 32/64 = 0.5 bits per parameter.
QLoRA quantizes them again: subtract their mean (`offset`), cut them into blocks of 256, and store each as an
8-bit index into the signed dynamic map (bitsandbytes' `create_dynamic_map(signed=True)`, derived in
`dynamic_map()`), with one float32 absmax per 256 blocks:

    bits per parameter = 4 (code) + 8/64 (8-bit absmax) + 32/(64*256) (nested absmax) = 4.127   (vs 4.5)

plus one float32 offset per tensor. The 8-bit step reproduces bitsandbytes' CPU kernel (>= 0.50): v = x/absmax
is snapped to the grid point i = floor((v + 1) / 2 * 65535 + 0.5) of 65536 over [-1, 1], and the map entry
nearest to that grid point is stored (not always the entry nearest to v, by up to half a grid step).

Dequantization is the reverse: absmax = nested_map[code8] * nested_absmax + offset (float32), then
weight = level[code4] * absmax computed in float32 and rounded once to the output dtype.
"""

from __future__ import annotations

import fnmatch
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_lab.utils import LoraLabError

NF4_OFFSET = 0.9677083  # probability of the outermost quantile (QLoRA / bitsandbytes)
NESTED_BLOCKSIZE = 256  # blocks of absmax values per float32 scale under double quantization
LUT_SIZE = 65536  # grid points over [-1, 1] used by bitsandbytes' CPU 8-bit quantizer
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# QLoRA's settings, the defaults everywhere (quantize_nf4, finetune/qlora.py, --quantize nf4 of every loader). A model
# quantized by quantize_nf4 records the settings it used as `model.base_quantization` (this dict's keys), which a
# QLoRA adapter saves as its config's base_quantization, so that every consumer rebuilds the same 4-bit base
# (lora_lab/adapted.py's load_base: from the weights as stored, then the rest cast).
NF4_DEFAULTS = {"method": "nf4", "blocksize": 64, "double_quant": True}


def nf4_settings(blocksize: int = NF4_DEFAULTS["blocksize"], double_quant: bool = NF4_DEFAULTS["double_quant"]) -> dict:
    """The settings dict a quantized model records and a QLoRA adapter saves ({"method", "blocksize",
    "double_quant"})."""
    return {"method": "nf4", "blocksize": blocksize, "double_quant": double_quant}
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the block sizes bitsandbytes accepts
USE_TORCH_COMPILE = True  # on CUDA, run dequantize + matmul through torch.compile (never on CPU)


# ------------------------------------------------------------------------------------------------------------
# The two code books
# ------------------------------------------------------------------------------------------------------------
def nf4_levels(device=None) -> torch.Tensor:
    """The 16 NF4 levels, ascending, float32 (16,). A fresh copy: layers never share (or corrupt) one tensor."""
    return _nf4_levels_cpu().to(device, copy=True)


@lru_cache(maxsize=None)
def _nf4_levels_cpu() -> torch.Tensor:
    # probabilities in float32 (as bitsandbytes builds them), quantiles in float64, levels rounded to float32
    p_pos = torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float32)[:-1]  # 8 probabilities > 0.5
    p_neg = torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float32)[:-1]  # 7 probabilities > 0.5
    positive = torch.special.ndtri(p_pos.double())  # (8,)
    negative = -torch.special.ndtri(p_neg.double())  # (7,)
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    return values / values.max()  # (16,) in [-1, 1]; the ends are exactly -1 and 1


def dynamic_map(device=None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map, ascending, float32 (256,).

    Beside 0 and 1 it holds, for each decade 10^-6 .. 10^0, the midpoints of 2^i equal steps of [0.1, 1]
    scaled by that decade, with both signs: a float-like type whose precision is finest near zero. A fresh copy."""
    return _dynamic_map_cpu().to(device, copy=True)


@lru_cache(maxsize=None)
def _dynamic_map_cpu() -> torch.Tensor:
    pieces = [torch.zeros(1), torch.ones(1)]
    for i in range(7):  # 7 exponent values: decades 10^-6 .. 10^0, the i-th with 2^i fraction values per sign
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0  # (2^i,)
        scaled = 10 ** (i - 6) * means
        pieces += [scaled, -scaled]
    return torch.cat(pieces).sort().values  # (256,): 2 * (1 + 2 + ... + 64) + 2


@lru_cache(maxsize=None)
def _grid_to_code(device) -> torch.Tensor:
    """For each of the 65536 grid points -1 + 2i/65535, the index of the nearest dynamic-map entry (int64)."""
    code = _dynamic_map_cpu()
    grid = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32)) / (LUT_SIZE - 1)  # (65536,)
    midpoints = 0.5 * (code[:-1] + code[1:])  # (255,)
    return torch.bucketize(grid, midpoints).to(device)  # number of midpoints strictly below each grid point


def _byte_table(code: torch.Tensor) -> torch.Tensor:
    """(256, 2) float32: the two levels a packed byte stands for, high nibble first."""
    byte = torch.arange(256, device=code.device)
    return torch.stack([code[byte >> 4], code[byte & 15]], dim=1)


def _unpack_levels(packed: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """The level of every packed element, in order: (2 * n_bytes,) float32.

    One lookup per byte in the 256-entry byte table. Each (256, 2) row is gathered as one int64 holding the two
    float32 bit patterns (a 1-d gather is much faster than copying 2-float rows), then viewed back as floats."""
    pairs = _byte_table(code.float()).view(torch.int64).view(256)  # (256,) bit copies of the float pairs
    return pairs.index_select(0, packed.reshape(-1).int()).view(torch.float32)  # (2 * n_bytes,)


# ------------------------------------------------------------------------------------------------------------
# Quantization state
# ------------------------------------------------------------------------------------------------------------
@dataclass
class NF4State:
    """What `dequantize_nf4` needs besides the packed codes.

    absmax: (n_blocks,) float32 per-block absmax, or, under double quantization, their uint8 codes into
    `nested_code`; then nested_absmax (ceil(n_blocks / 256),) float32, offset () float32 (the mean that was
    subtracted) and nested_code (256,) are set. `code` is the 16 NF4 levels. Same fields as bitsandbytes'
    QuantState, so `tensors()` maps onto its serialized keys."""

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    code: Optional[torch.Tensor] = None
    nested_absmax: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    def __post_init__(self):
        self.shape = torch.Size(self.shape)
        if self.code is None:
            self.code = nf4_levels(self.absmax.device)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def block_absmax(self) -> torch.Tensor:
        """The float32 absmax of every block (n_blocks,), undoing double quantization if needed."""
        if not self.double_quant:
            return self.absmax
        return _dequantize_8bit(self.absmax, self.nested_absmax, self.nested_code, self.nested_blocksize) + self.offset

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state's tensors by field name (those that are set), e.g. to store in a state dict."""
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def to(self, device) -> "NF4State":
        return replace(self, **{k: v.to(device) for k, v in self.tensors().items()})


# ------------------------------------------------------------------------------------------------------------
# Quantize / dequantize
# ------------------------------------------------------------------------------------------------------------
def quantize_nf4(weight, blocksize: int = NF4_DEFAULTS["blocksize"], double_quant: bool = NF4_DEFAULTS["double_quant"],
                 *, skip=("lm_head",)):
    """Quantize a float tensor to NF4: returns (packed uint8 (ceil(numel/2), 1), NF4State).

    Called with an nn.Module instead, swaps its nn.Linear layers for NF4Linear in place (see
    `quantize_model_nf4`, which `skip` is passed to), records the settings as `module.base_quantization` and
    returns the module."""
    if isinstance(weight, nn.Module):
        return quantize_model_nf4(weight, blocksize=blocksize, double_quant=double_quant, skip=skip)
    if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES:
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"quantize_nf4 takes a float32/float16/bfloat16 tensor or an nn.Module, got {got}")
    if not isinstance(blocksize, int) or blocksize <= 0 or blocksize % 2:
        raise ValueError(f"blocksize must be a positive even int (bitsandbytes: 32 ... 4096), got {blocksize!r}")
    if weight.numel() == 0:
        raise ValueError("quantize_nf4 got an empty tensor")
    with torch.no_grad():
        packed, absmax = _quantize_4bit(weight.detach(), blocksize)
        state = NF4State(absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize,
                         code=nf4_levels(weight.device))
        if double_quant:
            state.offset = absmax.mean()  # ()
            state.absmax, state.nested_absmax = _quantize_8bit(absmax - state.offset, NESTED_BLOCKSIZE)
            state.nested_code = dynamic_map(weight.device)
    return packed, state


def _quantize_4bit(weight: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = weight.reshape(-1).float()  # (n,) exact for fp16/bf16
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    rem = n % blocksize
    blocks = F.pad(flat, (0, blocksize - rem)) if rem else flat  # zero padding leaves the absmax unchanged
    blocks = blocks.view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    if not bool(absmax.isfinite().all()):  # a NaN or inf anywhere makes its block's absmax NaN or inf
        raise ValueError("cannot quantize a tensor that contains NaN or inf")
    # bitsandbytes multiplies full blocks by 1/absmax but divides a partial last block by its absmax, and stores
    # that block's absmax clamped to 1e-38: we do the same, so that the codes and statistics match bit for bit
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)  # (n_blocks, blocksize)
    if rem:
        absmax[-1] = absmax[-1].clamp(min=1e-38)
        scaled[-1, :rem] = flat[n - rem:] / absmax[-1]
    scaled = scaled.clamp_(-1, 1).view(-1)[:n + n % 2]  # (n rounded up to even,) an odd tensor gets one 0.0 more
    codes = _nearest_level(scaled).view(-1, 2)  # (n_bytes, 2) uint8
    packed = (codes[:, 0] << 4) | codes[:, 1]  # first element in the high nibble
    return packed.view(-1, 1), absmax  # (n_bytes, 1), (n_blocks,)


CELLS = 1024  # uniform cells over [-1, 1] for the nearest-level search


def _nearest_level(x: torch.Tensor) -> torch.Tensor:
    """Index of the nearest NF4 level for x in [-1, 1] (uint8), ties to the lower level.

    That index is the number of level midpoints strictly below x: torch.bucketize(x, midpoints). bucketize does
    a binary search per element; this gets the same count in a few vectorized passes. [-1, 1] is cut into 1024
    cells; widened by a cell on each side, each holds at most one midpoint (they are >= 0.08 apart). A table gives
    the midpoints below a cell and the one inside it (or +inf), so the count is below[cell] + (x > inside[cell]),
    decided by an exact float comparison: rounding in the cell computation (~1e-7) cannot move x out of its
    widened cell."""
    below, inside = _cell_tables(x.device)
    cell = x.add(1.0).mul_(CELLS / 2).to(torch.int32)  # (n,) x = 1 lands in the extra cell CELLS
    return below.index_select(0, cell) + (x > inside.index_select(0, cell))  # (n,) uint8


@lru_cache(maxsize=None)
def _cell_tables(device) -> tuple[torch.Tensor, torch.Tensor]:
    levels = _nf4_levels_cpu()
    midpoints = (levels[:-1] + levels[1:]) / 2  # (15,) float32, the bucketize boundaries
    mid = midpoints.double()
    width = 2.0 / CELLS
    left = torch.arange(CELLS + 1, dtype=torch.float64) * width - 1.0  # (CELLS + 1,) left edge of each cell
    lo, hi = left - width, left + 2 * width  # each cell widened by one cell on both sides
    below = (mid < lo.unsqueeze(1)).sum(1)  # (CELLS + 1,) midpoints below the widened cell
    inside = (mid >= lo.unsqueeze(1)) & (mid < hi.unsqueeze(1))  # (CELLS + 1, 15)
    assert bool((inside.sum(1) <= 1).all())
    inf = torch.tensor(float("inf"))
    inside_mid = torch.where(inside, midpoints, inf).amin(1)  # (CELLS + 1,) float32, +inf where none
    return below.to(torch.uint8).to(device), inside_mid.to(device)


def _quantize_8bit(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization of a float32 vector with the dynamic map, as bitsandbytes' CPU kernel does
    it: scale by 1/absmax, clamp, snap to the grid -1 + 2i/65535 (rounding half up), look the grid point's
    nearest map entry up. An all-zero block gets code 0 and absmax 0."""
    n = x.numel()
    n_blocks = -(-n // blocksize)
    blocks = F.pad(x, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scaled = (blocks * (1.0 / absmax).unsqueeze(1)).clamp_(-1, 1)  # NaN for all-zero blocks, fixed below
    grid_index = (((scaled + 1.0) * 0.5) * (LUT_SIZE - 1) + 0.5).nan_to_num_(0.0).to(torch.int64)  # truncation
    codes = _grid_to_code(x.device)[grid_index]  # (n_blocks, blocksize)
    codes = codes.masked_fill_((absmax == 0).unsqueeze(1), 0).to(torch.uint8)
    return codes.view(-1)[:n], absmax


def _dequantize_8bit(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = codes.numel()
    n_blocks = absmax.numel()
    values = F.pad(code[codes.long()], (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    return (values * absmax.unsqueeze(1)).view(-1)[:n]  # (n,) float32


def dequantize_nf4(packed: torch.Tensor, state: NF4State, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Packed NF4 codes + state -> tensor of state.shape in `dtype` (default: the dtype that was quantized).

    On CPU (outside torch.compile) this runs `_dequantize_cpu`, which computes the same bits faster."""
    dtype = dtype or state.dtype
    absmax = state.block_absmax()  # (n_blocks,) float32
    if packed.device.type == "cpu" and not torch.compiler.is_compiling():
        flat = _dequantize_cpu(packed.reshape(-1), state.code, absmax, state.numel, state.blocksize, dtype)
    else:
        flat = _dequantize_flat(packed.reshape(-1), state.code, absmax, state.numel, state.blocksize, dtype)
    return flat.view(state.shape)


def _dequantize_flat(packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, n: int, bs: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """The plain formulation, one vectorized op after the other: (n,) in dtype. Used on GPUs (where
    torch.compile fuses it), for the odd tail of `_dequantize_cpu`, and as the reference it is tested against."""
    n_blocks = -(-n // bs)
    values = _unpack_levels(packed, code)  # (2 * n_bytes,) float32
    if values.numel() != n_blocks * bs:  # odd element count or partial last block
        values = F.pad(values[:n], (0, n_blocks * bs - n))
    values = values.view(n_blocks, bs).mul_(absmax.unsqueeze(1))  # float32, then one rounding to dtype
    return values.view(-1)[:n].to(dtype)


# elements per step of _dequantize_cpu: torch's grain size, so that every op of a step runs on the calling thread
CPU_CHUNK = 32768


def _dequantize_cpu(packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, n: int, bs: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """`_dequantize_flat`, bit for bit, in fewer and cache-friendlier passes over memory (CPU).

    Chunk by chunk of CPU_CHUNK elements: the chunk's bytes index the 256-entry byte table (2 KiB, it stays in L1;
    a 65536-entry table of byte pairs was slower, its 1 MiB fell out of cache), and the levels are multiplied by
    their block's absmax straight into the result, in float32 and rounded once to dtype by the `out=` write. No
    full-size intermediates: on CPU their page faults cost as much as the arithmetic. A chunk is at most torch's
    grain size, so its ops run on this thread: on a busy machine, waking the thread pool for every small op costs
    more than the work. Elements past the last whole group of lcm(blocksize, 2) go through _dequantize_flat."""
    unit = math.lcm(bs, 2)  # a chunk holds whole blocks and whole bytes
    n_main = n - n % unit
    out = torch.empty(n, dtype=dtype)
    if n_main < n:  # the odd tail: a partial block or an odd element, from byte n_main/2 and block n_main/bs on
        out[n_main:] = _dequantize_flat(packed[n_main // 2:], code, absmax[n_main // bs:], n - n_main, bs, dtype)
    pairs = _byte_pairs(tuple(code.tolist()))  # (256,) float64 whose bits are the byte's two float32 levels
    chunk = max(unit, CPU_CHUNK // unit * unit)
    for byte, scale, result in zip(packed[:n_main // 2].split(chunk // 2), absmax[:n_main // bs].split(chunk // bs),
                                   out[:n_main].split(chunk)):
        levels = torch.index_select(pairs, 0, byte.int()).view(torch.float32)  # (m,) one 8-byte gather per byte
        torch.mul(levels.view(-1, bs), scale.unsqueeze(1), out=result.view(-1, bs))  # (m/bs, bs) level * absmax
    return out


@lru_cache(maxsize=8)
def _byte_pairs(code: tuple[float, ...]) -> torch.Tensor:
    """_byte_table as (256,) float64: each entry is the bit pattern of the byte's two float32 levels, so one 1-d
    gather of 8 bytes fetches both (much faster than gathering 2-float rows). Keyed by the 16 levels' values."""
    return _byte_table(torch.tensor(code, dtype=torch.float32)).view(torch.float64).view(256)


# ------------------------------------------------------------------------------------------------------------
# Linear layer
# ------------------------------------------------------------------------------------------------------------
def _dequantize_linear(x, packed, state, bias):
    return F.linear(x, dequantize_nf4(packed, state, x.dtype), None if bias is None else bias.to(x.dtype))


def _dequantize_matmul_t(grad_out, packed, state):
    return grad_out.matmul(dequantize_nf4(packed, state, grad_out.dtype))  # (..., out) @ (out, in)


_compiled: dict = {}


def _maybe_compiled(fn, x: torch.Tensor):
    """On CUDA, the torch.compile'd version of `fn` (fuses the dequantization into a few kernels); else `fn`."""
    if not (x.is_cuda and USE_TORCH_COMPILE):
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]


class _NF4LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W dequantized on the fly. Backward dequantizes W again instead of keeping the full-
    precision copy alive between forward and backward: the memory saving QLoRA relies on. W and its statistics
    are frozen (no gradient); x gets one, and so does the bias if it requires one."""

    @staticmethod
    def forward(ctx, x, packed, state, bias):
        ctx.packed, ctx.state = packed, state  # frozen buffers: held by the module anyway, no copy
        return _maybe_compiled(_dequantize_linear, x)(x, packed, state, bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _maybe_compiled(_dequantize_matmul_t, grad_out)(grad_out, ctx.packed, ctx.state)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.size(-1)).sum(0)
        return grad_x, None, None, grad_bias


def nf4_linear(x: torch.Tensor, packed: torch.Tensor, state: NF4State, bias: Optional[torch.Tensor] = None):
    """F.linear(x, dequantize_nf4(packed, state, x.dtype), bias) without keeping the dequantized weight."""
    return _NF4LinearFunction.apply(x, packed, state, bias)


# ------------------------------------------------------------------------------------------------------------
# A module's NF4 weight: NF4Linear's, or a LoRALinear's on an NF4 base (QLoRA), under the same names
# ------------------------------------------------------------------------------------------------------------
_STAT_BUFFERS = ("weight_absmax", "weight_code", "weight_nested_absmax", "weight_offset", "weight_nested_code")
NF4_BUFFERS = ("weight",) + _STAT_BUFFERS  # the packed codes, then the statistics
NF4_ATTRIBUTES = ("blocksize", "double_quant", "nested_blocksize", "dtype")  # dtype: the one quantized from


def holds_nf4(module: nn.Module) -> bool:
    """True for a module whose `weight` is stored in NF4 (an NF4Linear, or a LoRALinear on an NF4 base)."""
    return getattr(module, "quant_type", None) == "nf4"


def nf4_state_of(module: nn.Module) -> NF4State:
    """The NF4 buffers of `module` (out_features x in_features) as an NF4State (no copies)."""
    state = NF4State(absmax=module.weight_absmax, shape=(module.out_features, module.in_features),
                     dtype=module.dtype, blocksize=module.blocksize, code=module.weight_code)
    if module.double_quant:
        state.nested_absmax, state.offset = module.weight_nested_absmax, module.weight_offset
        state.nested_code, state.nested_blocksize = module.weight_nested_code, module.nested_blocksize
    return state


def move_nf4_weight(src: nn.Module, dst: nn.Module) -> None:
    """Give `dst` the NF4 weight of `src`: the same buffer tensors (no copy) under the same names, and the
    attributes that describe them; `dst`'s own `weight` (Parameter or buffer) is replaced."""
    dst._parameters.pop("weight", None)
    for name in NF4_BUFFERS:
        if getattr(src, name, None) is not None:
            dst.register_buffer(name, getattr(src, name))
    for name in NF4_ATTRIBUTES:
        setattr(dst, name, getattr(src, name))
    dst.quant_type = "nf4"


def drop_nf4_weight(module: nn.Module) -> None:
    """Remove the NF4 buffers and attributes of `module` (to give it a float weight instead)."""
    for name in NF4_BUFFERS:
        module._buffers.pop(name, None)
    for name in NF4_ATTRIBUTES:
        module.__dict__.pop(name, None)
    module.quant_type = None


@contextmanager
def nf4_statistics_kept(module: nn.Module):
    """Wrap a module's `_apply`: model.to(torch.bfloat16) / .half() must not round the NF4 statistics (or the
    8-bit codes' float32 scales). Inside, the statistics follow device moves only and keep their dtypes."""
    before = {name: module._buffers[name] for name in _STAT_BUFFERS if module._buffers.get(name) is not None}
    yield
    for name, old in before.items():
        new = module._buffers[name]
        if new.dtype != old.dtype:
            module._buffers[name] = old.to(new.device)


class NF4Linear(nn.Module):
    """A frozen nn.Linear stored in NF4.

    Buffers (all in the state dict): `weight` the packed codes (ceil(out*in/2), 1) uint8, `weight_absmax`
    (float32, or uint8 under double quantization), `weight_code` the 16 levels, and under double quantization
    `weight_nested_absmax`, `weight_offset`, `weight_nested_code`. `bias` stays a (frozen) float parameter.
    The forward pass dequantizes to x.dtype and runs F.linear."""

    quant_type = "nf4"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, blocksize: int = 64,
                 double_quant: bool = True, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.double_quant, self.dtype = blocksize, double_quant, dtype
        self.nested_blocksize = NESTED_BLOCKSIZE
        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        # empty buffers of the right shapes, for load_state_dict; from_linear / quantize() fill them
        self.register_buffer("weight", torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device))
        absmax_dtype = torch.uint8 if double_quant else torch.float32
        self.register_buffer("weight_absmax", torch.zeros(n_blocks, dtype=absmax_dtype, device=device))
        self.register_buffer("weight_code", nf4_levels(device))
        if double_quant:
            n_nested = -(-n_blocks // NESTED_BLOCKSIZE)
            self.register_buffer("weight_nested_absmax", torch.zeros(n_nested, device=device))
            self.register_buffer("weight_offset", torch.zeros((), device=device))
            self.register_buffer("weight_nested_code", dynamic_map(device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> "NF4Linear":
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, blocksize=blocksize,
                     double_quant=double_quant, dtype=w.dtype, device=w.device)
        if not w.is_meta:  # a meta model (built to load a quantized checkpoint into) gets empty shells
            module.quantize(w)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor) -> None:
        """Replace the stored weight by the NF4 quantization of `weight` (out_features, in_features)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit NF4Linear({self.in_features}, "
                             f"{self.out_features})")
        packed, state = quantize_nf4(weight, self.blocksize, self.double_quant)
        self.dtype = weight.dtype
        self.weight = packed
        for name, tensor in state.tensors().items():
            setattr(self, f"weight_{name}", tensor)

    @property
    def quant_state(self) -> NF4State:
        """The buffers as an NF4State (no copies)."""
        return nf4_state_of(self)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight (out_features, in_features) in `dtype` (default: the dtype it was quantized from)."""
        return dequantize_nf4(self.weight, self.quant_state, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight, self.quant_state, self.bias)  # (..., out_features)

    def _apply(self, fn, recurse=True):
        # the statistics follow device moves only, keeping their dtypes; the bias follows everything
        with nf4_statistics_kept(self):
            super()._apply(fn, recurse)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, dtype={self.dtype}")

    # ---- bitsandbytes' serialized Linear4bit ------------------------------------------------------------------
    def to_bnb_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """This layer as bitsandbytes' Linear4bit serializes itself (QuantState.as_dict(packed=True))."""
        if self.blocksize not in BNB_BLOCKSIZES:
            raise LoraLabError(f"bitsandbytes cannot load blocksize {self.blocksize}: quantize with one of "
                               f"{BNB_BLOCKSIZES} to export")
        sd = {prefix + "weight": self.weight}
        if self.bias is not None:
            sd[prefix + "bias"] = self.bias.detach()
        w = prefix + "weight."
        sd[w + "absmax"] = self.weight_absmax
        sd[w + "quant_map"] = self.weight_code
        meta = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": str(self.dtype).removeprefix("torch."),
                "shape": [self.out_features, self.in_features]}
        if self.double_quant:
            sd[w + "nested_absmax"] = self.weight_nested_absmax
            sd[w + "nested_quant_map"] = self.weight_nested_code
            meta.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                        nested_offset=self.weight_offset.item())
        # the non-tensor fields travel as the UTF-8 bytes of a JSON object, so the file stays safetensors-only
        sd[w + "quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
        return sd

    @classmethod
    def from_bnb_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str = "") -> "NF4Linear":
        """Build the layer from a bitsandbytes 4-bit state dict (keys `{prefix}weight`, `{prefix}weight.absmax`, ...)."""
        w = prefix + "weight."
        if w + "quant_state.bitsandbytes__fp4" in sd:
            raise LoraLabError(f"{prefix}weight is bitsandbytes FP4, not NF4: only NF4 can be loaded; quantize "
                               "the original weights again with quant_type='nf4'")
        key = w + "quant_state.bitsandbytes__nf4"
        if key not in sd or prefix + "weight" not in sd:
            raise LoraLabError(f"no bitsandbytes NF4 weight under {prefix!r} (missing {key}): pass the prefix of a "
                               "Linear4bit saved with quant_type='nf4'")
        meta = json.loads(bytes(sd[key].cpu().tolist()).decode())
        if len(meta["shape"]) != 2:
            raise LoraLabError(f"{prefix}weight has shape {meta['shape']}, not (out_features, in_features)")
        out_features, in_features = meta["shape"]
        packed = sd[prefix + "weight"]
        double_quant = w + "nested_absmax" in sd
        module = cls(in_features, out_features, bias=prefix + "bias" in sd, blocksize=meta["blocksize"],
                     double_quant=double_quant, dtype=getattr(torch, meta["dtype"]), device="meta")
        device = packed.device
        module.weight = packed.view(torch.uint8).reshape(-1, 1)  # bnb may store the bytes as another dtype
        module.weight_absmax = sd[w + "absmax"]
        module.weight_code = sd[w + "quant_map"].float()
        if double_quant:
            module.nested_blocksize = meta["nested_blocksize"]
            module.weight_nested_absmax = sd[w + "nested_absmax"].float()
            module.weight_nested_code = sd[w + "nested_quant_map"].float()
            module.weight_offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=device)
        if module.bias is not None:
            module.bias = nn.Parameter(sd[prefix + "bias"].detach().clone(), requires_grad=False)
        if module.weight.numel() != (in_features * out_features + 1) // 2:
            raise LoraLabError(f"{prefix}weight holds {module.weight.numel()} bytes, but shape {meta['shape']} "
                               f"needs {(in_features * out_features + 1) // 2}: the state dict is inconsistent")
        return module


# ------------------------------------------------------------------------------------------------------------
# Whole models
# ------------------------------------------------------------------------------------------------------------
def _skipped(name: str, skip) -> bool:
    """A layer is skipped when a pattern equals its qualified name or last component, or fnmatches the name."""
    return any(name == s or name.rsplit(".", 1)[-1] == s or fnmatch.fnmatchcase(name, s) for s in skip)


def quantize_model_nf4(model: nn.Module, blocksize: int = NF4_DEFAULTS["blocksize"],
                       double_quant: bool = NF4_DEFAULTS["double_quant"], skip=("lm_head",)) -> nn.Module:
    """Swap every nn.Linear of `model` (except those `skip` names, e.g. "lm_head", "blocks.0.*") for an NF4Linear,
    in place; returns the model. Embeddings and norms are not linear layers and stay as they are, and so does a
    linear layer whose weight is shared with another module (a tied lm_head: the embedding stays float). Quantize
    before adding LoRA adapters, so that the adapters' own layers stay in full precision."""
    if isinstance(skip, str):
        skip = (skip,)
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    # a linear layer that is not an nn.Linear (LoRALinear, AdapterV2Linear) would silently stay float: refuse it
    adapted = [name for name, m in model.named_modules() if hasattr(m, "in_features") and type(m) is not nn.Linear
               and not holds_nf4(m) and not _skipped(name, skip)]
    if adapted:
        raise LoraLabError(f"{adapted[0]} is a {type(model.get_submodule(adapted[0])).__name__}, not an nn.Linear: "
                           f"quantize the model with quantize_nf4(model) before injecting adapters")
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and not _skipped(name, skip) and uses[id(m.weight)] == 1]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, NF4Linear.from_linear(linear, blocksize=blocksize, double_quant=double_quant))
    model.base_quantization = nf4_settings(blocksize, double_quant)  # what a QLoRA adapter records of its base
    return model


def model_size_report(model: nn.Module) -> dict:
    """Bytes of the model's weights and the bits spent per NF4-quantized parameter.

    quantized_bytes counts the packed codes and the per-block statistics; the two code books (16 levels, 256-entry
    map) are constants of the format and counted apart in constant_bytes. unquantized_bytes is what the same model
    takes with the NF4 layers in the dtype they were quantized from."""
    quantized_params = quantized_bytes = constant_bytes = unquantized_extra = layers = 0
    counted: set[int] = set()
    for module in model.modules():
        if holds_nf4(module):  # NF4Linear, or a LoRA layer on an NF4 base
            layers += 1
            n = module.in_features * module.out_features
            quantized_params += n
            unquantized_extra += n * module.dtype.itemsize
            for name in ("weight", "weight_absmax", "weight_nested_absmax", "weight_offset"):
                t = getattr(module, name, None)
                if t is not None:
                    quantized_bytes += t.numel() * t.element_size()
                    counted.add(id(t))
            for name in ("weight_code", "weight_nested_code"):
                t = getattr(module, name, None)
                if t is not None:
                    constant_bytes += t.numel() * t.element_size()
                    counted.add(id(t))
    float_params = float_bytes = 0
    for t in model.state_dict(keep_vars=True).values():  # tied weights are one object: count them once
        if id(t) not in counted:
            counted.add(id(t))
            float_params += t.numel()
            float_bytes += t.numel() * t.element_size()
    return {
        "quantized_layers": layers,
        "quantized_params": quantized_params,
        "quantized_bytes": quantized_bytes,
        "bits_per_quantized_param": 8 * quantized_bytes / quantized_params if quantized_params else 0.0,
        "float_params": float_params,
        "float_bytes": float_bytes,
        "constant_bytes": constant_bytes,
        "total_bytes": quantized_bytes + float_bytes + constant_bytes,
        "unquantized_bytes": float_bytes + unquantized_extra,
    }
