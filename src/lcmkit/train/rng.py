"""Randomness: generators keyed by where a draw happens, and global RNG states in weights_only-loadable form."""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    """torch (CPU and CUDA), numpy and python global RNG states as tensors / ints / lists only."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def generator_for(*key: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded by a tuple of integers (seed, step, micro-batch, rank, ...): draws that depend only on
    where they happen in the run, so a resumed run redraws exactly what the straight run drew."""
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device).manual_seed(seed)
