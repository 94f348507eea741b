"""The torch engine's device loop (``_torch_loop.solve_device``): the same result as the host-driven solver, bit
for bit, and no host sync inside the Newton loop (checked on the CPU with a torch function mode that fails on
every operation that would sync a device; on CUDA with ``torch.cuda.set_sync_debug_mode``)."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from groupsparse.projection._group import as_group
from groupsparse.projection._solver import solve_shared
from groupsparse.projection._torch import TorchEngine
from groupsparse.projection._torch_loop import solve_device

# Tensor operations that move data to the host or whose output size depends on the data (a sync on a device).
_SYNCS = {"__bool__", "item", "tolist", "__float__", "__int__", "__index__", "cpu", "numpy", "__array__",
          "nonzero", "masked_select", "unique", "argwhere", "__len__"}


class NoSync(TorchFunctionMode):
    """Fails on any host sync (and on boolean-mask indexing, whose size the host must learn)."""

    calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        NoSync.calls += 1
        if name in _SYNCS or (name == "to" and any(str(a) == "cpu" for a in args[1:])):
            raise AssertionError(f"host sync inside the Newton loop: {name}")
        if name in ("__getitem__", "__setitem__") and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool:
            raise AssertionError("boolean-mask indexing inside the Newton loop")
        if name == "repeat_interleave" and (kwargs or {}).get("output_size") is None:
            raise AssertionError("repeat_interleave without output_size inside the Newton loop")
        return func(*args, **(kwargs or {}))


class CountSyncs(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _SYNCS:
            self.n += 1
        return func(*args, **(kwargs or {}))


def engine(x, device="cpu"):
    x = [v.to(device) for v in x] if isinstance(x, list) else x.to(device)
    g = as_group(x, axis=1) if not isinstance(x, list) else as_group(x)
    eng = TorchEngine(g.data, g.offsets, g.weights, g.uniform_length)
    eng.compact = False  # the host solver's CPU compaction sums in another order; the device never compacts
    return eng


def cases():
    rng = np.random.default_rng(1)
    signs = torch.from_numpy(rng.choice([-1.0, 1.0], (64, 32)))
    return {
        "dense64": torch.from_numpy(rng.normal(size=(50, 30))),
        "float32": torch.from_numpy(rng.normal(size=(7, 300)).astype(np.float32)),
        "ragged": [torch.from_numpy(rng.normal(size=n)) for n in rng.integers(2, 40, 30)],
        "ties": 0.1 * signs,  # every entry tied: a jump, split on the host at the end
        "mixed exponents": torch.from_numpy(rng.normal(size=(6, 20)) * 10.0 ** rng.integers(-300, 300, (6, 1))),
        # S convex at first: Newton from 0 overshoots past the top, the next steps are secants of the bracket
        "uniform": torch.from_numpy(rng.uniform(-1, 1, size=(40, 300))),
    }


@pytest.mark.parametrize("name", list(cases()))
@pytest.mark.parametrize("s, kw", [(0.6, {}), (0.3, {}), (0.97, {}), (0.6, {"mu0": 0.01}), (0.6, {"max_iter": 2})])
def test_device_loop_equals_host_solver(name, s, kw):
    x = cases()[name]
    max_iter, mu0 = kw.get("max_iter", 100), kw.get("mu0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_iter=2 warns on both
        a, ia = solve_shared(engine(x), s, tol=1e-12, max_iter=max_iter, mu0=mu0)
        b, ib = solve_device(engine(x), s, tol=1e-12, max_iter=max_iter, mu0=mu0, check_every=3, guard=NoSync)
    assert torch.equal(a, b)
    assert ia.as_dict() == ib.as_dict()


def test_no_sync_inside_the_loop_and_a_fixed_number_outside():
    """With one block for the whole loop, the number of host syncs does not grow with the Newton steps."""
    x = cases()["ties"]  # ~60 steps (bisection to adjacent doubles)
    counts = {}
    for max_iter in (3, 10, 25):  # all stop at max_iter with no upper end yet (the tie needs ~54 steps): one ending
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eng = engine(x)
            with CountSyncs() as c:
                _, info = solve_device(eng, 0.6, tol=1e-12, max_iter=max_iter, check_every=1000, guard=NoSync)
        counts[max_iter] = (c.n, info.iterations)
    assert len({n for n, _ in counts.values()}) == 1, counts
    assert len({it for _, it in counts.values()}) == 3, counts


def test_weighted_groups_fall_back_to_the_host_solver():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(size=(8, 10)))
    w = torch.from_numpy(rng.uniform(0.5, 2, size=(8, 10)))
    g = as_group(x, axis=1, weights=w)
    eng = TorchEngine(g.data, g.offsets, g.weights, g.uniform_length)
    out, info = solve_device(eng, 0.6, tol=1e-12, max_iter=100)
    assert info.converged and abs(info.sparsity - 0.6) <= 1e-12 + 1e-15


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["dense64", "float32", "ties", "ragged"])
def test_cuda_loop_does_not_sync(name):
    @contextlib.contextmanager
    def strict():
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    x = cases()[name]
    a, ia = solve_shared(engine(x, "cuda"), 0.6, tol=1e-12, max_iter=100)
    b, ib = solve_device(engine(x, "cuda"), 0.6, tol=1e-12, max_iter=100, guard=strict)
    assert torch.equal(a, b)
    assert ia.as_dict() == ib.as_dict()


def test_uniform_data_takes_secant_steps_not_tiny_bisections():
    """Regression (both loops): on uniform entries the host solver took 21-26 evaluations, bisecting bit patterns
    from lo = 0 after Newton overshot the top; the secant of the bracket brings it to <= 12."""
    x = cases()["uniform"]
    for s in (0.8, 0.9):
        _, ia = solve_shared(engine(x), s, tol=1e-12, max_iter=100)
        _, ib = solve_device(engine(x), s, tol=1e-12, max_iter=100, guard=NoSync)
        assert ia.evaluations == ib.evaluations <= 12, (ia.evaluations, ib.evaluations)



@pytest.mark.parametrize("name", list(cases()))
def test_host_and_device_evaluations_agree_bit_for_bit(name):
    """The loops agree only if every evaluation does: S and dS at any mu, host (``evaluate_shared``) against
    device (``evaluate_device``). The loop test above visits a few points per case; this one draws 200."""
    eng = engine(cases()[name])
    solve_shared(eng, 0.6, tol=1e-12, max_iter=100)  # sets the engine's units (shift)
    rng = np.random.default_rng(0)
    bad = []
    for mu in np.concatenate([rng.uniform(0, 1, 100), 10.0 ** rng.uniform(-8, 2, 100)]):
        host = eng.evaluate_shared(float(mu))
        S, dS, _, _ = eng.evaluate_device(torch.tensor(float(mu), dtype=torch.float64))
        if (host.S, host.dS) != (S.item(), dS.item()):
            bad.append(float(mu))
    assert not bad, f"{len(bad)} of 200 points differ, e.g. mu = {bad[:3]}"
