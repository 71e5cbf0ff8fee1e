"""Hidden tests of assignment 3 (training techniques): a step written out by hand, checkpointing by its
recomputation, autocast by the dtype of a matmul."""

import pytest
import torch
from _reference import llama_pieces  # noqa: F401 (a fixture: assignment 1's pieces as plain formulas)

from minillama import create_model, get_preset
from minillama.training import TrainConfig
from minillama.training.train import _autocast, train_step

pytestmark = pytest.mark.usefixtures("llama_pieces")


def small_model(seed=0):
    args = get_preset("tiny").replace(n_layers=2, dim=32, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=32)
    return create_model(args, seed=seed)


def batches():
    g = torch.Generator().manual_seed(31)
    out = []
    for rows, t in ((2, 9), (3, 6)):
        x = torch.randint(0, 64, (rows, t), generator=g)
        y = torch.randint(0, 64, (rows, t), generator=g)
        y[0, :3] = -100
        out.append((x, y))
    return out


def test_train_step_equals_a_hand_written_step():
    """Two ragged micro-batches, a GradScaler at scale 1024 and clipping at 0.05: same loss, grad norm and
    weights after one SGD step as the step written out by hand (sum of token losses / all tokens, the
    true gradient's norm, clip, p -= lr * g)."""
    model, ref = small_model(), small_model()
    micro = batches()
    n = sum(int((y != -100).sum()) for _, y in micro)
    loss = sum(torch.nn.functional.cross_entropy(ref(x).flatten(0, 1), y.flatten(), ignore_index=-100,
                                                 reduction="sum") for x, y in micro) / n
    loss.backward()
    grads = [p.grad.clone() for p in ref.parameters()]
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    coef = min(1.0, 0.05 / (float(norm) + 1e-6))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    out = train_step(model, opt, scaler, micro, TrainConfig(grad_clip=0.05))
    assert out["tokens"] == n and abs(out["loss"] - loss.item()) < 1e-5
    assert abs(out["grad_norm"] - float(norm)) < 1e-4 * float(norm)
    for p, q, g in zip(model.parameters(), ref.parameters(), grads):
        torch.testing.assert_close(p.detach(), q.detach() - 0.1 * coef * g, atol=1e-6, rtol=1e-5)
        assert p.grad is None
    assert out["skipped"] is False


def test_checkpointed_forward_recomputes_and_keeps_gradients():
    """With checkpointing every block runs its forward twice (once again in backward), gradients unchanged."""
    grads, calls = {}, {}
    x, y = batches()[0]
    for every in (0, 1):
        model = small_model()
        model.train()
        model.set_checkpointing(every)
        count = [0]
        model.layers[1].attention_norm.register_forward_pre_hook(lambda *a: count.__setitem__(0, count[0] + 1))
        model(x, y).backward()
        grads[every] = [p.grad for p in model.parameters()]
        calls[every] = count[0]
    assert calls == {0: 1, 1: 2}
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_autocast_step_runs_matmuls_in_bf16():
    """_autocast(cpu, "bf16") makes a float32 matmul return bfloat16; "off" leaves it float32."""
    a = torch.randn(4, 4)
    with _autocast(torch.device("cpu"), "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with _autocast(torch.device("cpu"), "off"):
        assert (a @ a).dtype == torch.float32
