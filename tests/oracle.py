"""Helpers for comparing against the PyTorch reference implementations."""

import numpy as np


def numpy_state(module) -> dict:
    """A torch module's state dict as numpy arrays, as a user's file would hold them."""
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def randomize(module, seed=0, scale=None):
    """Fills every parameter (including norm affines and zero-initialized layers) with seeded random values so no
    weight can go unnoticed; `scale` defaults to 1/sqrt(fan_in) per tensor, keeping activations O(1)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:  # norms and biases: around their usual values
                base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                s = scale if scale is not None else fan_in ** -0.5
                p.copy_(s * torch.randn(p.shape, generator=g))
    return module


def rel_err(actual, expected) -> float:
    """Max abs error relative to the output scale (max |expected|)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))


def assert_close(actual, expected, tol, what=""):
    err = rel_err(actual, expected)
    print(f"{what}: rel err {err:.3g} (tol {tol:g})")
    assert err <= tol, f"{what}: max abs error / max |expected| = {err:.3g} > {tol:g}"
