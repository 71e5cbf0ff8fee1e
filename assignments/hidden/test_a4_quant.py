"""Hidden tests of assignment 4 (NF4): bytes against bitsandbytes on other shapes and block sizes, the
nibble packing against a loop, the 4-bit linear against x W^T + b with W dequantised by bitsandbytes."""

import pytest
import torch
from torch import nn

from minillama.quant import Linear4bit, dequantize_4bit, pack_4bit, quantize_4bit, unpack_4bit


@pytest.mark.parametrize("shape,blocksize,dtype", [((7, 33), 64, torch.float32), ((5, 128), 128, torch.bfloat16),
                                                   ((3, 3, 11), 32, torch.float16)])
def test_nf4_bytes_equal_bitsandbytes_on_odd_shapes(shape, blocksize, dtype):
    """Packed bytes and absmax equal bitsandbytes' quantize_4bit; dequantised = code[idx] * absmax."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    g = torch.Generator().manual_seed(41)
    w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    packed, state = quantize_4bit(w, blocksize, "nf4")
    ref, ref_state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    assert torch.equal(packed.reshape(-1), ref.reshape(-1))
    torch.testing.assert_close(state.absmax.float(), ref_state.absmax.float(), atol=0, rtol=0)
    n = w.numel()
    b = ref.reshape(-1).long()
    idx = torch.stack([b // 16, b % 16], 1).reshape(-1)[:n]
    want = (ref_state.code[idx] * ref_state.absmax.float()[torch.arange(n) // blocksize]).to(dtype).reshape(shape)
    torch.testing.assert_close(dequantize_4bit(packed, state), want, atol=0, rtol=0)


def test_pack_unpack_match_a_slow_formula():
    """Nine indices: bytes idx[2k] * 16 + idx[2k+1], the last padded with `pad`; unpack inverts."""
    idx = torch.tensor([3, 15, 0, 9, 12, 1, 7, 7, 14], dtype=torch.uint8)
    want = [idx[0] * 16 + idx[1], idx[2] * 16 + idx[3], idx[4] * 16 + idx[5], idx[6] * 16 + idx[7], 14 * 16 + 6]
    packed = pack_4bit(idx, pad=6)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 1)
    assert packed.reshape(-1).tolist() == [int(v) for v in want]
    assert torch.equal(unpack_4bit(packed, 9), idx)


def test_linear4bit_forward_and_backward_match_the_formula():
    """Forward x W^T + b and dL/dx = g W, with W dequantised by bitsandbytes from the same weights."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(42)
    lin = nn.Linear(64, 24, bias=True)
    layer = Linear4bit.from_linear(lin, compute_dtype=torch.float32)
    ref, state = bnbf.quantize_4bit(lin.weight.detach(), blocksize=64, quant_type="nf4")
    w = bnbf.dequantize_4bit(ref, state).float()
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, x @ w.T + lin.bias, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w, atol=1e-5, rtol=1e-5)
