"""thermo under torch.compile: values match eager, recompiles stay bounded, and hooks added
after a compile are made to fire."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo.testing

import thermo
from tests.test_thermometer import batches, tiny_gpt, train


def run(compiled: bool, steps: int, backend="aot_eager"):
    torch._dynamo.reset()
    model = tiny_gpt()
    therm = thermo.Thermometer(model, flush_every=4, attn_every=3)
    counter = None
    if compiled:
        counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
        model = torch.compile(model, backend=counter)
    records = train(model, therm, batches(steps))
    therm.close()
    return records, counter


def test_compiled_values_match_eager_and_recompiles_are_bounded():
    eager, _ = run(False, 10)
    compiled, counter = run(True, 10)
    assert [r.step for r in compiled] == list(range(10))
    for e, c in zip(eager, compiled):
        assert set(e.layers) == set(c.layers), f"step {e.step}: different stats recorded"
        for key, v in e.layers.items():
            assert c.layers[key] == pytest.approx(v, rel=1e-4, abs=1e-6), f"step {e.step} {key}"
        assert c.scalars["loss"] == pytest.approx(e.scalars["loss"], rel=1e-5)
        assert c.scalars["grad_norm"] == pytest.approx(e.scalars["grad_norm"], rel=1e-4)
    # Sampled (exact logits) and unsampled steps are two graphs; nothing recompiles per step.
    assert 1 <= counter.frame_count <= 4, f"{counter.frame_count} compiles in 10 steps"
    sampled = [r.step for r in compiled if ("h.0.attn", "attn_max") in r.layers]
    assert sampled == [0, 3, 6, 9]


def test_thermometer_attached_after_a_compile_still_records():
    torch._dynamo.reset()
    model = tiny_gpt()
    compiled = torch.compile(model, backend="aot_eager")
    b = batches(1)[0]
    compiled(b[:, :-1], b[:, 1:])  # compiled before thermo: hooks added now would never fire
    with pytest.warns(UserWarning, match="reset torch.compile's cache"):
        therm = thermo.Thermometer(compiled, flush_every=1)
    (rec,) = train(compiled, therm, [b])
    therm.close()
    assert ("h.0", "act_max") in rec.layers and ("h.1.attn", "attn_max") in rec.layers


@pytest.mark.slow
def test_inductor():
    """The default backend (generated C++ kernels on CPU): values match eager."""
    eager, _ = run(False, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled, counter = run(True, 4, backend="inductor")
    for e, c in zip(eager, compiled):
        for key, v in e.layers.items():
            assert c.layers[key] == pytest.approx(v, rel=1e-4, abs=1e-6), f"step {e.step} {key}"
    assert counter.frame_count <= 4
