"""The hidden tests' own LLaMA pieces (plain formulas), so that assignments 2-5 are graded on their own:
a test of the training step must not fail because RMSNorm (assignment 1) is still a stub."""

import pytest
import torch

from minillama import model as model_module


def rms_norm(self, x):
    xf = x.float()
    return self.weight * (xf / torch.sqrt((xf * xf).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def swiglu(self, x):
    a = self.w1(x)
    return self.w2(a * torch.sigmoid(a) * self.w3(x))


def rope(x, cos, sin):
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * torch.complex(cos, sin)[None, :, None, :]).flatten(-2).to(x.dtype)


def cache_update(self, start_pos, k, v):
    end = self.check(start_pos, k)
    self.k[:k.shape[0], :, start_pos:end] = k
    self.v[:k.shape[0], :, start_pos:end] = v
    self.length = end
    return self.k[:k.shape[0], :, :end], self.v[:k.shape[0], :, :end]


@pytest.fixture
def llama_pieces(monkeypatch):
    """Replace assignment 1's pieces by the formulas above for one test (SDPA attention is used)."""
    monkeypatch.setattr(model_module.RMSNorm, "forward", rms_norm)
    monkeypatch.setattr(model_module.FeedForward, "forward", swiglu)
    monkeypatch.setattr(model_module, "apply_rope", rope)
    monkeypatch.setattr(model_module.KVCache, "update", cache_update)
