"""Hand-written backward passes that keep fewer tensors than autograd would: a memory technique.

minillama.model holds the formulas as the paper and Meta's code write them, differentiated by autograd.
Here the same formulas get a forward and a backward written by hand (torch.autograd.Function), each keeping
the fewest tensors for the backward pass and recomputing cheap element-wise results instead:

    RMSNormFunction     RMSNorm                keeps x and 1/rms (not x's fp32 copy nor x_hat)
    SiLUMul             silu(w1 x) * w3 x      keeps w1 x and w3 x (not silu(w1 x))
    SiLUMulLinear       w2(silu(w1 x) * w3 x)  keeps w1 x and w3 x (not w2's input p), for a plain trainable w2
    LinearCrossEntropy  the loss               keeps its gradients only (never every position's logits)

They are switched on from outside, as torch.compile (training.techniques.compile_blocks) and LoRA are:
enable_kernels(model) gives each RMSNorm and FeedForward and the model's loss an instance-level method that
shadows the class's; disable_kernels(model) deletes them. Values and gradients equal the plain model's
(tests/test_kernels.py). Without a backward pass (torch.no_grad: evaluation, generation) the plain forward
runs, so nothing changes there.
"""

from __future__ import annotations

import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .model import FeedForward, RMSNorm, Transformer, loss_chunk


class RMSNormFunction(torch.autograd.Function):
    """y = weight * x_hat, x_hat = x * rstd, rstd = 1 / sqrt(mean(x^2) + eps) (in fp32, as RMSNorm.forward).

    Backward, with g = grad * weight in fp32:  dL/dx = rstd * (g - x_hat * mean(g * x_hat)),
                                               dL/dweight = sum over positions of grad * x_hat.
    Keeps: x (in its own dtype) and rstd ([..., 1], fp32). Why: autograd through the formula keeps x's fp32
    copy (a new tensor when x is bf16) for pow and for the product with rstd, and, when the weight trains,
    x_hat for the weight's gradient as well: up to three [tokens, dim] tensors per norm instead of one.
    x_hat is recomputed from x and rstd in the backward (one element-wise product)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.float()  # one fp32 copy (x itself when x is fp32), used twice and not kept
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).type_as(x)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        x_hat = (x.float() * rstd).type_as(x)
        grad_w = None
        if ctx.needs_input_grad[1]:  # y = weight * x_hat: sum over every position
            grad_w = (grad * x_hat).flatten(0, -2).sum(0).to(weight.dtype)
        # y_hat = x * rstd: d/dx = rstd * (g - x_hat * mean(g * x_hat)), g the gradient w.r.t. x_hat (fp32)
        g = (grad * weight).float()
        x_hat = x_hat.float()
        grad_x = rstd * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
        return grad_x.type_as(x), grad_w, None


class SiLUMul(torch.autograd.Function):
    """p = silu(a) * b, silu(a) = a * sigmoid(a): SwiGLU's gate (a = w1 x, b = w3 x).

    Backward:  dL/da = grad * b * sigmoid(a) * (1 + a * (1 - sigmoid(a))),  dL/db = grad * silu(a).
    Keeps: a and b. Why: autograd's plain `F.silu(a) * b` keeps a (for silu), b and silu(a) (for the product):
    one [tokens, hidden] tensor per layer more. silu(a) is recomputed in the backward instead (element-wise,
    cheap beside the matrix products)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return _silu_mul_grads(grad, a, b)


def _silu_mul_grads(grad, a, b):
    """Gradients of silu(a) * b with respect to a and b, given the gradient of the product."""
    # d/da silu(a) * b = grad * b * silu'(a) (aten's silu_backward, in fp32 inside); d/db = grad * silu(a)
    grad_a = torch.ops.aten.silu_backward(grad * b, a)
    if grad.dtype != a.dtype:
        return grad_a, grad * F.silu(a)
    return grad_a, F.silu(a).mul_(grad)  # in place in the fresh silu(a): one [tokens, hidden] temporary less


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """F.silu(a) * b, equal in value and gradients, keeping one tensor less for the backward (SiLUMul)."""
    return SiLUMul.apply(a, b)


class SiLUMulLinear(torch.autograd.Function):
    """y = p @ weight.T with p = silu(a) * b: SwiGLU's gate and w2 in one step (a plain, bias-free w2).

    Backward:  dL/dweight = grad.T @ p (p recomputed),  dL/dp = grad @ weight, then SiLUMul's formulas for a, b.
    Keeps: a, b and the weight (a parameter: no extra memory). Why: w2's own backward keeps its input p
    ([tokens, hidden]) for the weight's gradient, the third tensor of that size per layer beside a and b.
    p is recomputed in the backward instead (one element-wise product more)."""

    @staticmethod
    def forward(ctx, a, b, weight):
        ctx.save_for_backward(a, b, weight)
        return F.linear(F.silu(a) * b, weight)

    @staticmethod
    def backward(ctx, grad):
        a, b, weight = ctx.saved_tensors
        grad_w = None
        if ctx.needs_input_grad[2]:  # p again (made in place: one temporary), used once and freed
            grad_w = (grad.flatten(0, -2).t() @ F.silu(a).mul_(b).flatten(0, -2)).to(weight.dtype)
        grad_p = grad @ weight.to(grad.dtype)  # under autocast the forward ran in grad's dtype
        return *_silu_mul_grads(grad_p, a, b), grad_w


class LinearCrossEntropy(torch.autograd.Function):
    """loss = sum or mean over positions with target != -100 of logsumexp(z) - z[target], z = h @ weight.T (fp32).

    Backward:  dL/dz = softmax(z) - one_hot(target) (zero at ignored positions), so
               dL/dh = dL/dz @ weight,  dL/dweight = dL/dz.T @ h.
    Keeps: only those two gradients, computed in the forward a chunk of positions at a time (loss_chunk) while
    the chunk's logits are at hand; the backward multiplies them by the incoming scalar. Why: autograd keeps
    every position's fp32 logits (or log-softmax) until the backward, 4 * vocab bytes per token (128 KB with
    Llama-2's 32,000 words: more than a whole block's activations in Llama-2-7B); the gradients are
    [tokens, dim] and [vocab, dim] in fp32 (the latter only when the head trains)."""

    @staticmethod
    def forward(ctx, h, weight, targets, reduction: str, chunk: int, need_h: bool, need_w: bool):
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        valid = targets != -100
        count = valid.sum()
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], chunk):
            h_c, t_c, v_c = h[i:i + chunk], targets[i:i + chunk], valid[i:i + chunk]
            logits = F.linear(h_c, weight).float()  # the model's dtype, then fp32 for the softmax
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, t_c.clamp(min=0)[:, None])[:, 0]
            total += ((lse - picked) * v_c).sum()
            if grad_h is None and grad_w is None:
                continue
            # d loss / d logits = softmax - one_hot(target), zero for ignored positions (computed in place)
            g = logits.sub_(lse[:, None]).exp_()
            g[torch.arange(len(t_c), device=g.device), t_c.clamp(min=0)] -= 1
            g *= v_c[:, None]
            if grad_h is not None:
                grad_h[i:i + chunk] = g.to(weight.dtype) @ weight
            if grad_w is not None:
                if h_c.dtype == grad_w.dtype:  # added inside the matrix product: no extra pass over grad_w
                    torch.addmm(grad_w, g.t(), h_c, out=grad_w)  # (FlopCounterMode does not count addmm_)
                else:
                    grad_w += g.t().to(h_c.dtype) @ h_c
        scale = 1.0 / count if reduction == "mean" else torch.ones((), device=h.device)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w, scale)
        return total * scale if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, scale = ctx.saved_tensors
        g = grad_out * scale
        return (None if grad_h is None else grad_h * g.to(grad_h.dtype),
                None if grad_w is None else (grad_w * g).to(ctx.weight_dtype), None, None, None, None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                         chunk: Optional[int] = None) -> torch.Tensor:
    """F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=-100, reduction=reduction), equal
    in value and gradients, without materialising the logits: h [N, dim], weight [vocab, dim], targets [N].
    chunk: positions per chunk (default: loss_chunk(N, vocab))."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy(reduction={reduction!r}): expected 'mean' or 'sum'.")
    chunk = chunk or loss_chunk(h.shape[0], weight.shape[0])
    # Gradients only where a backward pass can follow: not under torch.no_grad (evaluation), not for frozen tensors
    grad = torch.is_grad_enabled()
    return LinearCrossEntropy.apply(h, weight, targets, reduction, chunk, grad and h.requires_grad,
                                    grad and weight.requires_grad)


# ---- switching them on from outside ---------------------------------------------------------------------
def _rmsnorm_forward(self: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled():
        return RMSNormFunction.apply(x, self.weight, self.eps)
    return type(self).forward(self, x)  # no backward follows: the plain formula


def _feed_forward_forward(self: FeedForward, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return type(self).forward(self, x)
    w2 = self.w2
    # SiLUMulLinear needs w2's weight itself: a plain bias-free nn.Linear whose weight trains (full fine-tuning).
    # A LoRA or 4-bit w2 keeps (or needs) no input of its own base weight: silu_mul alone saves the most there.
    if self.kernel_recompute_product and type(w2) is nn.Linear and w2.bias is None and w2.weight.requires_grad:
        return SiLUMulLinear.apply(self.w1(x), self.w3(x), w2.weight)
    return w2(silu_mul(self.w1(x), self.w3(x)))


def _loss(self: Transformer, h: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    if type(self.output) is not nn.Linear or self.output.bias is not None:  # a wrapped head: the plain loss
        return type(self).loss(self, h, targets, reduction)
    return linear_cross_entropy(h.flatten(0, 1), self.output.weight, targets.flatten(), reduction)


def enable_kernels(model: Transformer) -> Transformer:
    """Run model's RMSNorms, FeedForwards and loss through the hand-written backward passes above, in place.

    The same parameters, names and state_dict; only grad-enabled calls change. Apply it after LoRA, 4-bit
    weights and set_checkpointing, before compile_blocks: a checkpointed block keeps its FeedForward's w2 on
    autograd (SiLUMulLinear's tensors would be kept only after w2's matrix product, so the recomputation in the
    backward would redo that product too). Calling it again re-reads the checkpointing."""
    if not isinstance(model, Transformer):
        raise TypeError(f"enable_kernels: expected a minillama Transformer, got {type(model).__name__}.")
    every = model.checkpoint_every
    for i, layer in enumerate(model.layers):
        layer.feed_forward.kernel_recompute_product = not (every and i % every == 0)
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.forward = types.MethodType(_rmsnorm_forward, m)
        elif isinstance(m, FeedForward):
            m.forward = types.MethodType(_feed_forward_forward, m)
    model.loss = types.MethodType(_loss, model)
    return model


def disable_kernels(model: Transformer) -> Transformer:
    """Back to the plain model: delete the instance-level methods that enable_kernels set."""
    for m in model.modules():
        if isinstance(m, (RMSNorm, FeedForward)):
            vars(m).pop("forward", None)
            vars(m).pop("kernel_recompute_product", None)
    vars(model).pop("loss", None)
    return model


def kernels_enabled(model: Transformer) -> bool:
    """Whether enable_kernels(model) is in effect."""
    return "loss" in vars(model)
