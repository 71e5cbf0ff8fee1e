"""Hidden tests of assignment 2 (LoRA), against PEFT and the formula W0 + alpha/r B A."""

import math

import pytest
import torch
from torch import nn

from minillama import create_model, get_preset
from minillama.lora import LoRALinear, apply_lora


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(12, 10, bias=True)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_equals_peft_with_trained_weights(rslora):
    """With random (trained-looking) A and B, LoRALinear(r=4, alpha=8) equals PEFT's LoRA layer."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(21)
    net = Net()
    ours = LoRALinear(nn.Linear(12, 10, bias=True), r=4, alpha=8, use_rslora=rslora)
    ours.base.load_state_dict(net.proj.state_dict())
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=0.0, use_rslora=rslora)
    ref = peft.get_peft_model(net, cfg)
    layer = ref.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.normal_()
        layer.lora_B["default"].weight.normal_()
        ours.lora_A["default"].weight.copy_(layer.lora_A["default"].weight)
        ours.lora_B["default"].weight.copy_(layer.lora_B["default"].weight)
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_merge_equals_the_formula_and_unmerge_restores():
    """merge adds alpha/r * B @ A into the weight (float64 formula); output unchanged; unmerge restores W0."""
    torch.manual_seed(22)
    lin = LoRALinear(nn.Linear(16, 8, bias=False), r=2, alpha=6)
    with torch.no_grad():
        lin.lora_B["default"].weight.normal_()
    w0 = lin.base.weight.detach().clone()
    x = torch.randn(4, 16)
    before = lin(x)
    lin.merge()
    A, B = lin.lora_A["default"].weight.double(), lin.lora_B["default"].weight.double()
    torch.testing.assert_close(lin.base.weight.double(), w0.double() + 3.0 * B @ A, atol=1e-5, rtol=0)
    torch.testing.assert_close(lin(x), before, atol=1e-5, rtol=1e-5)
    lin.unmerge()
    assert lin.merged == []
    torch.testing.assert_close(lin.base.weight, w0, atol=1e-6, rtol=0)


def test_apply_lora_wraps_exactly_the_targets():
    """apply_lora(targets=("wq", "w2"), r=2) wraps those two linears of every layer and trains only A, B."""
    args = get_preset("tiny").replace(n_layers=2, dim=32, n_heads=4, n_kv_heads=4)
    model = create_model(args)
    apply_lora(model, r=2, alpha=4, targets=("w2", "wq"))
    for layer in model.layers:
        for name in ("wq", "wk", "wv", "wo"):
            assert isinstance(getattr(layer.attention, name), LoRALinear) == (name == "wq")
        for name in ("w1", "w2", "w3"):
            assert isinstance(getattr(layer.feed_forward, name), LoRALinear) == (name == "w2")
    hidden = model.layers[0].feed_forward.w1.out_features
    expected = args.n_layers * 2 * ((32 + 32) + (hidden + 32))  # r * (in + out) for wq and w2
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    assert math.isclose(model.layers[1].attention.wq.scaling["default"], 2.0)
