"""The numba population scan equals a plain numpy loop over time, across neuron blocks.

The equivalence with nengo_dl.Simulator is tested in test_fast_engine.py on small networks
(fewer neurons than one block); here populations span several blocks and a partial one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from transforms.neuron_kernels import BLOCK, NEURONS, run_population

F32 = np.float32


def numpy_scan(y, b_in, b_out, scale, dt, amplitude, voltage, decays, gains, n_steps):
    """Spiking ReLU with synapses, one step at a time over all neurons, in numpy float32."""
    J = scale * (y + b_in) + b_out  # (B, T or 1, N)
    voltage = np.broadcast_to(voltage, J[:, 0].shape).copy()
    filtered = [np.zeros_like(voltage) for _ in decays]
    outs = [np.empty((len(y), n_steps, y.shape[2]), F32) for _ in decays]
    rates = np.empty((len(y), n_steps), F32)
    for t in range(n_steps):
        v = voltage + np.maximum(J[:, min(t, J.shape[1] - 1)], F32(0)) * dt
        n = np.floor(v)
        voltage = v - n
        s = n * (amplitude / dt)
        rates[:, t] = s.mean(axis=1, dtype=np.float64) * scale
        for k, (a, b) in enumerate(zip(decays, gains)):
            outs[k][:, t] = s if np.isnan(a) else filtered[k]
            filtered[k] = filtered[k] if np.isnan(a) else a * filtered[k] + b * s
    return outs, rates


@pytest.mark.parametrize("constant", [True, False])
def test_spiking_scan_equals_numpy_loop_over_blocks(constant):
    rng = np.random.default_rng(4)
    images, steps, neurons = 3, 7, 2 * BLOCK + 123
    y = rng.normal(0.2, 0.5, (images, 1 if constant else steps, neurons)).astype(F32)
    b_in = rng.normal(0, 0.1, neurons).astype(F32)
    b_out = np.zeros(neurons, F32)
    voltage = rng.random(neurons, dtype=F32)
    decay = math.exp(-0.001 / 0.005)
    decays, gains = np.array([decay, np.nan], F32), np.array([1 - decay, np.nan], F32)
    scale, dt, amplitude = F32(100), F32(0.001), F32(1 / F32(100))
    outs = tuple(np.full((images, steps, neurons), np.nan, F32) for _ in decays)
    rates = np.empty((images, steps), F32)
    run_population(y, b_in, b_out, scale, NEURONS["spiking-relu"], dt, amplitude, voltage, np.zeros(neurons, F32),
                   decays, gains, outs, rates)
    expected, expected_rates = numpy_scan(y, b_in, b_out, scale, dt, amplitude, voltage, decays, gains, steps)
    assert expected[1].sum() > 0, "the neurons should spike"
    for got, want in zip(outs, expected):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(rates, expected_rates, rtol=1e-6)
