"""The flat parameter vector, initialisation and the .npz weights file."""

import numpy as np
import pytest

from shardprop.workers.errors import WeightsFileError
from shardprop.workers.network.params import (
    Layout,
    init_params,
    load_weights,
    save_weights,
    to_arrays,
)


def test_views_share_memory_with_the_flat_vector():
    layout = Layout((3, 4, 2))
    theta = np.zeros(layout.size)
    assert layout.size == 4 * 3 + 4 + 2 * 4 + 2
    W1, W2 = layout.weights(theta)
    b1, b2 = layout.biases(theta)
    assert (W1.shape, b1.shape, W2.shape, b2.shape) == ((4, 3), (4,), (2, 4), (2,))
    W2[1, 3] = 7.0
    b1[0] = 5.0
    assert theta.sum() == 12.0
    assert all(np.shares_memory(view, theta) for view in (W1, b1, W2, b2))


@pytest.mark.parametrize("scheme", ["he", "xavier", "normal"])
def test_init_depends_on_seed_only(scheme):
    layout = Layout((10, 20, 5, 1))
    a = init_params(layout, scheme, 42, np.float64)
    b = init_params(layout, scheme, 42, np.float64)
    c = init_params(layout, scheme, 43, np.float64)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(init_params(layout, scheme, 42, np.float32), a.astype(np.float32))
    assert all(np.all(bias == 0) for bias in layout.biases(a))


def test_init_scales_follow_the_scheme():
    layout = Layout((400, 300, 1))
    W1 = layout.weights(init_params(layout, "he", 0, np.float64))[0]
    assert W1.std() == pytest.approx(np.sqrt(2 / 400), rel=0.02)
    W1 = layout.weights(init_params(layout, "xavier", 0, np.float64))[0]
    assert W1.std() == pytest.approx(np.sqrt(2 / 700), rel=0.02)


def test_weights_file_round_trip(tmp_path):
    layout = Layout((3, 5, 2))
    theta = init_params(layout, "he", 0, np.float64)
    path = save_weights(tmp_path / "w.npz", layout, theta)
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["W1", "W2", "b1", "b2"]
        assert npz["W1"].shape == (5, 3)
    loaded_layout, loaded = load_weights(path)
    assert loaded_layout == layout
    assert np.array_equal(loaded, theta)
    _, as32 = load_weights(path, layout, np.float32)
    assert as32.dtype == np.float32


def write(path, arrays):
    np.savez(path, **arrays)
    return path


@pytest.fixture
def good_arrays():
    layout = Layout((3, 5, 2))
    return layout, to_arrays(layout, init_params(layout, "he", 0, np.float64))


def test_missing_array_is_named(tmp_path, good_arrays):
    layout, arrays = good_arrays
    del arrays["b2"]
    with pytest.raises(WeightsFileError, match=r"missing array 'b2' of shape \(2,\)"):
        load_weights(write(tmp_path / "w.npz", arrays), layout)


def test_wrong_shape_names_array_and_expected_shape(tmp_path, good_arrays):
    layout, arrays = good_arrays
    arrays["W2"] = np.zeros((2, 4))
    with pytest.raises(WeightsFileError, match=r"'W2' has shape \(2, 4\); expected \(2, 5\)"):
        load_weights(write(tmp_path / "w.npz", arrays), layout)


def test_nan_is_refused(tmp_path, good_arrays):
    layout, arrays = good_arrays
    arrays["W1"][0, 0] = np.nan
    with pytest.raises(WeightsFileError, match="'W1' has 1 non-finite"):
        load_weights(write(tmp_path / "w.npz", arrays), layout)


def test_pickled_object_array_is_refused(tmp_path, good_arrays):
    layout, arrays = good_arrays
    arrays["b1"] = np.array([{"evil": 1}, 2], dtype=object)
    with pytest.raises(WeightsFileError, match="'b1' holds pickled Python objects"):
        load_weights(write(tmp_path / "w.npz", arrays), layout)


def test_unreadable_or_absent_file_is_refused(tmp_path):
    with pytest.raises(WeightsFileError, match="no such weights file"):
        load_weights(tmp_path / "absent.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(WeightsFileError, match=r"not a readable \.npz"):
        load_weights(tmp_path / "junk.npz")


def test_inconsistent_file_without_layout_is_refused(tmp_path, good_arrays):
    _, arrays = good_arrays
    arrays["W2"] = np.zeros((2, 7))
    with pytest.raises(WeightsFileError, match=r"'W2' has shape \(2, 7\); expected \(2, 5\)"):
        load_weights(write(tmp_path / "w.npz", arrays))
