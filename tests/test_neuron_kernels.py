"""The numba population scan equals a plain numpy loop over time, across neuron blocks, and
its event-by-event projection equals TensorFlow's convolution.

The equivalence with nengo_dl.Simulator is tested in test_fast_engine.py on small networks
(fewer neurons than one block); here populations span several blocks and a partial one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from transforms.fast_engine import Step, _taps
from transforms.nengo_shim import tf
from transforms.neuron_kernels import BLOCK, NEURONS, run_population

F32 = np.float32
NAN2 = np.full(2, np.nan, F32)
NO_TAPS = np.empty((0, 0), np.int64)
NO_PROJECTION = (np.empty((0, 0), F32), NO_TAPS, NO_TAPS, np.empty((0, 0, 0), F32))


def scan(y, b_in, b_out, scale, neuron, dt, amplitude, voltage, outs, rates, input_synapse=NAN2,
         decays=NAN2, gains=NAN2, projection=NO_PROJECTION, limit=None):
    """run_population with its padded arguments filled in (outs: one or two arrays; limit:
    every output by default); returns its dense flags."""
    limit = rates.shape[1] * y.shape[2] if limit is None else limit
    padded = tuple(outs) + (np.empty((0, 0, 0), F32),) * (2 - len(outs))
    dense = np.zeros(len(y), np.uint8)
    run_population(y, input_synapse, b_in, b_out, scale, NEURONS[neuron], dt, amplitude, voltage,
                   np.zeros_like(voltage), decays, gains, padded, len(outs), rates, *projection, limit, dense)
    return dense


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
@pytest.mark.parametrize("start", [(0, 1), (-0.5, 1.5)])
def test_spiking_scan_equals_numpy_loop_over_blocks(constant, start):
    """On a constant input, only neurons that may spike run (a third here have J <= 0);
    a voltage starting outside [0, 1) makes a neuron with J <= 0 spike all the same."""
    rng = np.random.default_rng(4)
    images, steps, neurons = 3, 7, 2 * BLOCK + 123
    y = rng.normal(0.2, 0.5, (images, 1 if constant else steps, neurons)).astype(F32)
    b_in = rng.normal(0, 0.1, neurons).astype(F32)
    b_out = np.zeros(neurons, F32)
    voltage = rng.uniform(*start, neurons).astype(F32)
    decay = math.exp(-0.001 / 0.005)
    decays, gains = np.array([decay, np.nan], F32), np.array([1 - decay, np.nan], F32)
    scale, dt, amplitude = F32(100), F32(0.001), F32(1 / F32(100))
    outs = tuple(np.full((images, steps, neurons), np.nan, F32) for _ in decays)
    rates = np.empty((images, steps), F32)
    scan(y, b_in, b_out, scale, "spiking-relu", dt, amplitude, voltage, outs, rates, decays=decays, gains=gains)
    expected, expected_rates = numpy_scan(y, b_in, b_out, scale, dt, amplitude, voltage, decays, gains, steps)
    assert expected[1].sum() > 0, "the neurons should spike"
    for got, want in zip(outs, expected):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(rates, expected_rates, rtol=1e-6)


def test_input_synapse_filters_y_with_a_one_step_delay():
    rng = np.random.default_rng(5)
    images, steps, neurons = 2, 6, BLOCK + 77
    y = rng.normal(0, 1, (images, steps, neurons)).astype(F32)
    zeros = np.zeros(neurons, F32)
    a = F32(math.exp(-0.001 / 0.005))
    out, rates = np.empty_like(y), np.empty((images, steps), F32)
    scan(y, zeros, zeros, F32(1), "identity", F32(0.001), F32(1), zeros, (out,), rates,
         input_synapse=np.array([a, 1 - a], F32))
    expected, state = np.empty_like(y), np.zeros((images, neurons), F32)
    for t in range(steps):
        expected[:, t] = state
        state = a * state + (1 - a) * y[:, t]
    np.testing.assert_array_equal(out, expected)


def project(x, weights, strides=(1, 1), padding="SAME", limit=None):
    """x (B, T, H, W, C) event by event through a convolution: (z, rates, dense flags) of
    ``scan``, and TensorFlow's convolution of x, all (B, T, ...) flat."""
    images, steps, shape = x.shape[0], x.shape[1], x.shape[2:]
    expected = tf.nn.conv2d(x.reshape((-1,) + shape), weights, strides, padding).numpy()
    offsets, rows = _taps(Step("c", "conv", True, strides=strides, padding=padding), weights, shape,
                          expected.shape[1:])
    z = np.full((images, steps, int(np.prod(expected.shape[1:]))), np.nan, F32)
    rates = np.full((images, steps), np.nan, F32)
    size, zeros = int(np.prod(shape)), np.zeros(int(np.prod(shape)), F32)
    dense = scan(x.reshape(images, steps, size), zeros, zeros, F32(1), "identity", F32(0.001), F32(1), zeros, (),
                 rates, projection=(weights.reshape(-1, weights.shape[3]), offsets, rows, z), limit=limit)
    return z, rates, dense, expected.reshape(z.shape)


@pytest.mark.parametrize("shape, kernel, strides, padding", [
    ((64, 64, 16), (3, 3), (2, 2), "SAME"),
    ((11, 9, 3), (5, 3), (2, 1), "SAME"),
    ((10, 7, 2), (2, 2), (3, 2), "SAME"),
    ((9, 12, 4), (3, 4), (2, 3), "VALID"),
    ((1, 1, BLOCK + 300), (1, 1), (1, 1), "VALID"),  # a Dense layer, its inputs over two blocks
])
def test_projection_of_sparse_outputs_equals_tensorflows_convolution(shape, kernel, strides, padding):
    rng = np.random.default_rng(6)
    images, steps, n_out = 2, 3, 5
    x = rng.normal(0, 1, (images, steps) + shape).astype(F32) * (rng.random((images, steps) + shape) < 0.2)
    weights = rng.normal(0, 1, kernel + (shape[2], n_out)).astype(F32)
    z, _, _, expected = project(x, weights, strides, padding)
    np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-5)


def test_an_image_over_the_limit_is_flagged_and_left_to_the_dense_op():
    """Images with more nonzero outputs than the limit stop, flagged, their z and rates
    unwritten; the others' z equals TensorFlow's convolution."""
    rng = np.random.default_rng(7)
    shape, steps, n_out = (12, 10, 4), 5, 3
    density = np.array([0.01, 0.4, 0.05, 0.3])[:, None, None, None, None]
    x = rng.normal(0, 1, (4, steps) + shape).astype(F32) * (rng.random((4, steps) + shape) < density)
    nonzero = (x != 0).reshape(4, -1).sum(axis=1)
    weights = rng.normal(0, 1, (3, 3, shape[2], n_out)).astype(F32)
    z, rates, dense, expected = project(x, weights, limit=int(nonzero[2] + nonzero[3]) // 2)
    np.testing.assert_array_equal(dense, [0, 1, 0, 1])
    np.testing.assert_allclose(z[[0, 2]], expected[[0, 2]], rtol=1e-5, atol=1e-5)
    assert np.isnan(z[[1, 3]]).all() and np.isnan(rates[[1, 3]]).all() and not np.isnan(rates[[0, 2]]).any()
