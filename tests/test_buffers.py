"""Reused output arrays: a pool hands back what it was given, and engines fill them whole."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from transforms.buffers import BufferPool, check_features


def test_pool_reuses_given_back_arrays_and_holds_no_more_than_were_out_at_once():
    pool = BufferPool((3, 2))
    first, second = pool.take(), pool.take()
    assert first.shape == (3, 2) and first.dtype == np.float32 and first is not second
    pool.give(first)
    pool.give(second)
    taken = [pool.take() for _ in range(3)]  # two reused, then a new one
    assert {id(a) for a in taken[:2]} == {id(first), id(second)}
    assert all(a is not first and a is not second for a in taken[2:])


def test_pool_is_shared_by_threads_without_handing_one_array_out_twice():
    pool, out, lock = BufferPool((4,)), set(), threading.Lock()
    clashes = []

    def work():
        for _ in range(200):
            array = pool.take()
            with lock:
                if id(array) in out:
                    clashes.append(id(array))
                out.add(id(array))
            with lock:
                out.discard(id(array))
            pool.give(array)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not clashes


@pytest.mark.parametrize("array", [np.zeros((3, 3), np.float32), np.zeros((3, 2), np.float64)])
def test_pool_refuses_an_array_not_its_own_shape_and_type(array):
    with pytest.raises(ValueError, match=r"not one of this pool's \(3, 2\) float32 arrays"):
        BufferPool((3, 2)).give(array)


def test_check_features_accepts_a_fitting_array_and_refuses_others():
    fitting = np.zeros((2, 3), np.float32)
    assert check_features(fitting, (2, 3)) is fitting
    assert check_features(None, (2, 3)).shape == (2, 3)
    for bad in (np.zeros((3, 2), np.float32), np.zeros((2, 3)), np.zeros((3, 2), np.float32).T):
        with pytest.raises(ValueError, match=r"C-contiguous float32 of shape \(2, 3\)"):
            check_features(bad, (2, 3))
