"""minillama.kernels, the hand-written backward passes, switched on from outside: the same values and
gradients as the plain model (autograd through model.py's formulas), with and without LoRA, in fp32 and bf16.
The memory they save is tested in test_compare.py (saved tensors) and test_memory.py (the memory model)."""

import pytest
import torch

from minillama.config import ModelArgs
from minillama.kernels import disable_kernels, enable_kernels, kernels_enabled
from minillama.lora import apply_lora
from minillama.model import RMSNorm, create_model
from minillama.training import TrainConfig, prepare_model

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=16, max_seq_len=32)


def _loss_and_grads(model, tokens, targets, amp: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = model(tokens, targets)
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


# fp32: the same formulas, rounded at other places: within 1e-5 relative. bf16 (the weights, or fp32 weights
# under bf16 autocast): bf16 keeps 8 significant bits (2**-8 = 0.4% per rounding) and the kernels round at other
# places than autograd does (x_hat recomputed, silu(a) recomputed, the loss's gradients made per chunk): every
# gradient within 2% of its largest element (measured: 0.9% at most on this model).
@pytest.mark.parametrize("lora", [None, "all"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-amp"])
def test_kernels_equal_the_plain_model(precision, lora):
    model = create_model(ARGS, seed=0, dtype=torch.bfloat16 if precision == "bf16" else None)
    if lora:  # on every linear, w2 included (the FeedForward kernel then keeps w2 on autograd)
        torch.manual_seed(0)
        apply_lora(model, r=4, alpha=8, targets=lora)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapters count
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(0, ARGS.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    targets = tokens.roll(-1, 1)
    targets[:, :3] = -100  # a masked prompt
    amp = precision == "bf16-amp"
    plain_loss, plain = _loss_and_grads(model, tokens, targets, amp)
    enable_kernels(model)
    loss, grads = _loss_and_grads(model, tokens, targets, amp)
    assert grads.keys() == plain.keys() and len(grads) > 0
    if precision == "fp32":
        torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
        for name in plain:
            torch.testing.assert_close(grads[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    else:
        torch.testing.assert_close(loss, plain_loss, rtol=1e-2, atol=0)
        for name in plain:
            scale = plain[name].abs().max().item()
            torch.testing.assert_close(grads[name], plain[name], rtol=0, atol=2e-2 * scale, msg=name)


def test_enable_and_disable_from_outside():
    """enable_kernels sets instance-level methods only (the same parameters and state_dict, the class's
    forward untouched); disable_kernels removes them; without a backward pass the plain forward runs."""
    model = create_model(ARGS, seed=0)
    keys = list(model.state_dict())
    tokens = torch.randint(0, ARGS.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(tokens, tokens)
    enable_kernels(model)
    assert kernels_enabled(model) and list(model.state_dict()) == keys
    assert all("forward" in vars(m) for m in model.modules() if isinstance(m, RMSNorm))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, tokens), plain, rtol=1e-6, atol=1e-6)
    disable_kernels(model)
    assert not kernels_enabled(model)
    assert not any("forward" in vars(m) for m in model.modules())
    with pytest.raises(TypeError, match="expected a minillama Transformer"):
        enable_kernels(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("kernels", [True, False])
def test_train_config_switches_the_kernels(kernels):
    """TrainConfig.kernels (on by default; `minillama train --no-kernels` turns it off) is applied by
    prepare_model after checkpointing, which keeps a checkpointed block's w2 on autograd."""
    assert TrainConfig().kernels is True
    model = prepare_model(create_model(ARGS, seed=0), TrainConfig(kernels=kernels, checkpointing=2))
    assert kernels_enabled(model) is kernels
    if kernels:
        assert [layer.feed_forward.kernel_recompute_product for layer in model.layers] == [False, True]
