"""The fast engine's scans over time: neuron updates and lowpass synapses, compiled with numba.

A population's scan is elementwise in the neurons and sequential in time. Run as one pass
over all neurons per step (``tf.scan``, even XLA-compiled), it streams the neuron state and
every synapse's state through memory at each step. Here each block of ``BLOCK`` neurons runs
all its steps while its state stays in cache, so memory sees each input once and each
output once (measured on one core, 16 images x 30 steps x 32,768 neurons: 57 ms for the
XLA-compiled ``tf.scan``, ~15 ms here).

Arithmetic is nengo-dl's, in float32 and in the same order, so spike counts agree with
``nengo_dl.Simulator`` up to float ties (see ``transforms.fast_engine``).

A spiking population can also run the next layer's Conv2D or Dense: its scan records an
image's nonzero outputs (``_record``), then each adds its value times the kernel taps it
reaches to the next layer's input (``_project``), which that layer's scan filters through
the synapse. The sums come in another order than a convolution's, so they differ from it
by float rounding. An image with too many nonzero outputs is left to the dense op.
"""

from __future__ import annotations

import math

import numba
import numpy as np

BLOCK = 4096  # neurons whose state is kept in cache while they run all steps
STRIPES = 16  # a block's spikes are searched for column by column over this many stripes
NEURONS = {"relu": 0, "spiking-relu": 1, "lif": 2, "identity": 3}  # "identity": s = J
LIF_TAU_RC, LIF_TAU_REF = np.float32(0.02), np.float32(0.002)  # nengo.LIF's defaults (s)
_ZERO, _ONE = np.float32(0), np.float32(1)


@numba.njit(nogil=True, cache=True)
def _current(y, b_in, b_out, scale, J) -> None:
    """J = scale * (y + b_in) + b_out: a Conv2D's bias enters as b_in, a Dense's as
    b_out = scale * b (zeros for the other, which leaves the result exact)."""
    for i in range(J.size):
        J[i] = scale * (y[i] + b_in[i]) + b_out[i]


@numba.njit(nogil=True, cache=True)
def _relu(J, s, amplitude) -> None:
    for i in range(J.size):
        s[i] = max(J[i], _ZERO) * amplitude


@numba.njit(nogil=True, cache=True)
def _spiking_relu(J, voltage, s, dt, amp_dt) -> None:
    """nengo's SpikingRectifiedLinear: v += relu(J) dt, n = floor(v), v -= n."""
    for i in range(J.size):
        v = voltage[i] + max(J[i], _ZERO) * dt
        n = np.floor(v)
        voltage[i] = v - n
        s[i] = n * amp_dt


@numba.njit(nogil=True, cache=True)
def _lif(J, voltage, refractory, s, dt, amp_dt) -> None:
    """nengo's LIF step (tau_rc 20 ms, tau_ref 2 ms) with its sub-step spike timing."""
    for i in range(J.size):
        delta_t = min(max(dt - refractory[i], _ZERO), dt)
        v = voltage[i] + (voltage[i] - J[i]) * np.float32(math.expm1(-delta_t / LIF_TAU_RC))
        if v > _ONE:
            partial = -LIF_TAU_RC * np.float32(math.log1p((_ONE - v) / (J[i] - _ONE)))
            refractory[i] = LIF_TAU_REF - partial
            voltage[i] = _ZERO
            s[i] = amp_dt
        else:
            refractory[i] = refractory[i] - dt
            voltage[i] = max(v, _ZERO)
            s[i] = _ZERO


@numba.njit(nogil=True, cache=True, fastmath=True)
def _sum(s) -> float:
    """Sum in float64 (any order: the sum only feeds the mean firing rate)."""
    total = 0.0
    for i in range(s.size):
        total += s[i]
    return total


@numba.njit(nogil=True, cache=True)
def _emit(s, filtered, a, b, out) -> None:
    """Write this step's output of one synapse to ``out``: F(t) = a F(t-1) + b s(t-1),
    F(0) = 0 (``filtered`` holds F(t) and takes on F(t+1)); a NaN passes s(t) unfiltered."""
    if np.isnan(a):
        out[:] = s
        return
    for i in range(s.size):
        out[i] = filtered[i]
        filtered[i] = a * filtered[i] + b * s[i]


@numba.njit(nogil=True, cache=True)
def _record(s, neurons, seen, where, values, count) -> int:
    """Append the nonzero outputs ``s`` of ``neurons`` (their indices in the population) to
    ``where`` and ``values`` from ``count`` on; return the new count. seen: int32 scratch
    of len(s) / STRIPES.

    Spikes are rare, so s is searched in two passes: the bitwise OR of STRIPES stripes of
    s (elementwise, so vectorized), then only the columns where that is nonzero.
    """
    bits = s.view(np.int32)
    width = (s.size + STRIPES - 1) // STRIPES
    seen[:width] = 0
    for stripe in range(STRIPES):
        part = bits[stripe * width : (stripe + 1) * width]
        for j in range(part.size):
            seen[j] |= part[j]
    for j in range(width):
        if seen[j] == 0:
            continue
        for i in range(j, s.size, width):
            if s[i] != 0:
                where[count], values[count] = neurons[i], s[i]
                count += 1
    return count


@numba.njit(nogil=True, cache=True, fastmath={"contract"})
def _project(where, values, first, stop, kernel, offsets, rows, z) -> None:
    """Add recorded outputs ``first:stop`` (``_record``) through a convolution to ``z`` (one
    step's output, flat (OH, OW, K)).

    kernel: (kh * kw * C, K), row (ky * kw + kx) * C + c; offsets, rows: (H * W, kh * kw),
    for each input pixel the flat output offsets (oy * OW + ox) * K its kernel taps reach
    (-1 past the last) and their kernel rows less the channel. A Dense layer is the
    convolution with H = W = kh = kw = 1.
    """
    channels = kernel.shape[0] // offsets.shape[1]
    for event in range(first, stop):
        _add_taps(values[event], where[event], channels, kernel, offsets, rows, z)


@numba.njit(nogil=True, cache=True, fastmath={"contract"})
def _add_taps(value, neuron, channels, kernel, offsets, rows, z) -> None:
    """z[offset:offset + K] += value * kernel[row] for each tap of ``neuron``."""
    pixel, c = divmod(neuron, channels)
    for tap in range(offsets.shape[1]):
        base = offsets[pixel, tap]
        if base < 0:
            break
        row = rows[pixel, tap] + c
        for k in range(kernel.shape[1]):
            z[base + k] += value * kernel[row, k]


_LIF_SILENT_BELOW = np.float32(1 - 2**-16)  # far below the threshold, 1, by more than rounding


@numba.njit(nogil=True, cache=True)
def _active(J, neuron, dt, voltage0, index) -> int:
    """For a constant input current J (N,): write to ``index`` the neurons that may spike,
    and return how many. The others never do: a spiking ReLU whose increment relu(J) dt is
    0 and whose voltage starts in [0, 1) stays put; a LIF neuron whose J and starting
    voltage are below 1 only ever moves between them. ReLU networks leave many inputs below
    zero (the shipped sample's blank canvas: 96% of its first layer)."""
    count = 0
    for i in range(J.size):
        if neuron == 1:
            silent = max(J[i], _ZERO) * dt == _ZERO and _ZERO <= voltage0[i] < _ONE
        else:
            silent = J[i] < _LIF_SILENT_BELOW and voltage0[i] < _LIF_SILENT_BELOW
        if not silent:
            index[count] = i
            count += 1
    return count


@numba.njit(nogil=True, cache=True)
def run_population(y, input_synapse, b_in, b_out, scale, neuron, dt, amplitude, voltage0, refractory0, decays,
                   gains, outs, n_outs, rates, kernel, offsets, rows, z, limit, dense):
    """Run one neuron population over all steps, its synapses fused in.

    y: the layer's linear output, (B, T, N) float32, or (B, 1, N) for an input that is the
    same at every step; input_synapse: (a, b) of a lowpass on y (NaN: none), for a y that
    is the linear op of the layer below's unfiltered output; b_in, b_out, voltage0,
    refractory0: (N,) (see ``_current``; the initial neuron state); scale: the
    converter's gain on J; neuron: a value of NEURONS; dt (s); amplitude: output per unit
    rate (spikes give amplitude / dt); decays, gains: (K,) the synapses' a and b = 1 - a
    (a NaN: no synapse).
    Writes outs[k] (B, T, N) for k < n_outs: the output through synapse k; rates (B, T):
    the mean output over the neurons, times ``scale`` (Hz for spiking neurons); and, where
    z is not empty (B, T, M), adds each nonzero output through ``kernel`` at ``offsets``
    and ``rows`` (see ``_project``) to z: the next layer's linear op, event by event. An
    image with more than ``limit`` nonzero outputs stops there, with dense[image] = 1 and
    its z and rates left unwritten: event by event would cost it more than the dense
    linear op. Spiking neurons on a constant y run only where they may spike
    (``_active``); the rest output zeros.
    """
    n_images, n_steps = rates.shape
    n_neurons = y.shape[2]
    constant = y.shape[1] == 1
    filter_input = not np.isnan(input_synapse[0])
    project = z.shape[2] > 0
    compact = constant and not filter_input and (neuron == 1 or neuron == 2)
    amp_dt = amplitude / dt
    index = np.arange(n_neurons)  # the neurons that run, in blocks
    J = np.empty(BLOCK, np.float32)
    s = np.empty(BLOCK, np.float32)
    voltage = np.empty(BLOCK, np.float32)
    refractory = np.empty(BLOCK, np.float32)
    filtered_in = np.empty(BLOCK, np.float32)  # the input synapse's state
    constant_J = np.empty(n_neurons if compact else 0, np.float32)  # every neuron's, on a constant y
    filtered = np.empty((n_outs, BLOCK), np.float32)
    emitted = np.empty(BLOCK, np.float32)
    seen = np.empty(BLOCK // STRIPES, np.int32)
    # An image's nonzero outputs, recorded block by block and step by step (``_record``),
    # then added to z step by step, each step's row of z in cache while it fills.
    capacity = limit + BLOCK if project else 0
    where, values = np.empty(capacity, np.int64), np.empty(capacity, np.float32)
    segments = np.empty(((n_neurons + BLOCK - 1) // BLOCK) * n_steps + 1, np.int64)  # (block, step) starts
    totals = np.zeros((n_images, n_steps))
    for image in range(n_images):
        running, count = n_neurons, 0
        dense[image] = 0
        if compact:
            _current(y[image, 0], b_in, b_out, scale, constant_J)
            running = _active(constant_J, neuron, dt, voltage0, index)
            for k in range(n_outs):
                outs[k][image] = 0
        for start in range(0, running, BLOCK):
            if dense[image]:
                break
            stop = min(start + BLOCK, running)
            w = stop - start
            neurons = index[start:stop]
            if compact:  # gathered
                for i in range(w):
                    n = neurons[i]
                    voltage[i], refractory[i], J[i] = voltage0[n], refractory0[n], constant_J[n]
            else:
                voltage[:w] = voltage0[start:stop]
                refractory[:w] = refractory0[start:stop]
            filtered[:, :w] = 0
            filtered_in[:w] = 0
            for t in range(n_steps):
                if filter_input:
                    _emit(y[image, t, start:stop], filtered_in[:w], input_synapse[0], input_synapse[1], s[:w])
                    _current(s[:w], b_in[start:stop], b_out[start:stop], scale, J[:w])
                elif not compact and (t == 0 or not constant):
                    _current(y[image, 0 if constant else t, start:stop], b_in[start:stop], b_out[start:stop], scale,
                             J[:w])
                if neuron == 0:
                    _relu(J[:w], s[:w], amplitude)
                elif neuron == 1:
                    _spiking_relu(J[:w], voltage[:w], s[:w], dt, amp_dt)
                elif neuron == 2:
                    _lif(J[:w], voltage[:w], refractory[:w], s[:w], dt, amp_dt)
                else:
                    s[:w] = J[:w]
                totals[image, t] += _sum(s[:w])
                for k in range(n_outs):
                    if compact:
                        _emit(s[:w], filtered[k, :w], decays[k], gains[k], emitted[:w])
                        outs[k][image, t][neurons] = emitted[:w]
                    else:
                        _emit(s[:w], filtered[k, :w], decays[k], gains[k], outs[k][image, t, start:stop])
                if project:
                    segments[(start // BLOCK) * n_steps + t] = count
                    count = _record(s[:w], neurons, seen, where, values, count)
                    if count > limit:
                        dense[image] = 1
                        break
        if project and not dense[image]:
            blocks = (running + BLOCK - 1) // BLOCK
            segments[blocks * n_steps] = count
            for t in range(n_steps):
                z[image, t] = 0
                for segment in range(t, blocks * n_steps, n_steps):  # the step's segment of each block
                    _project(where, values, segments[segment], segments[segment + 1], kernel, offsets, rows,
                             z[image, t])
    for image in range(n_images):
        if dense[image]:
            continue
        for t in range(n_steps):
            rates[image, t] = totals[image, t] / n_neurons * scale
