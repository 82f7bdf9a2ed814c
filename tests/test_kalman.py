"""The vectorised Kalman filter equals the plain sequential filter of docs/algorithms.md, masks included, for any shape,
dtype, length and q/r; and its gains are the table the KRPO spec quotes."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kalmanrl.rl.kalman import kalman_filter, kalman_gains


def sequential_filter(z: torch.Tensor, mask: torch.Tensor | None, q: float, r: float, x0: float,
                      p0: float, gains: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: docs/algorithms.md's loop, one row and one token at a time, in float64; masked tokens skipped.
    `gains` [T]: K_n for a row's n-th valid token instead of the loop's own."""
    rows = z.detach().double().reshape(-1, z.shape[-1])
    valid = torch.ones_like(rows, dtype=torch.bool) if mask is None else mask.reshape(rows.shape).bool()
    out = torch.zeros_like(rows)
    for i in range(rows.shape[0]):
        x, p, n = x0, p0, 0
        for t in range(rows.shape[1]):
            if valid[i, t]:
                prior = p + q
                gain = prior / (prior + r) if gains is None else gains[n].item()
                x = x + gain * (rows[i, t].item() - x)
                p, n = (1 - gain) * prior, n + 1
                out[i, t] = x
    return out.reshape(z.shape)


def authors_gains_step_by_step(q: float, r: float, p0: float, steps: int) -> np.ndarray:
    """The KPO authors' closed-form gains (shuohe1995/verl-kpo core_algos.py:1501-1551) written out in numpy float32,
    one rounding per operation in their order. log is correctly rounded (float64, then float32; their torch.log is
    MKL's, equal to it at these q on the CPU); sinh is the one they call, torch's float32 sinh, as they call it
    (sinh(eta) on a 0-d tensor, then on all T values)."""
    f32 = np.float32

    def sinh(x):
        return torch.sinh(torch.from_numpy(np.asarray(x, dtype=f32))).numpy()

    a, k0 = f32(q) / f32(r), f32(p0) / f32(r)
    s = f32(1) + f32(0.5) * a
    eta = f32(math.log(float(s + np.sqrt(np.maximum(s * s - f32(1), f32(0))))))
    t = np.arange(steps, dtype=f32) + f32(1)
    u = sinh(t * eta) / np.maximum(sinh(eta), f32(1e-20))  # U_{t-1}
    u_before = np.concatenate([np.zeros(1, f32), u[:-1]])  # U_{t-2}
    numerator = (u - u_before) * k0 + u * a
    denominator = u * k0 + (u * (a + f32(1)) - u_before)
    return np.clip(numerator / denominator, f32(1e-6), f32(1 - 1e-6))


def assert_matches_reference(z, mask, q, r, x0, p0):
    fast = kalman_filter(z, mask, q=q, r=r, x0=x0, p0=p0)
    assert fast.dtype == z.dtype and fast.shape == z.shape
    assert torch.isfinite(fast).all()
    reference = sequential_filter(z, mask, q, r, x0, p0)
    scale = max(1.0, abs(x0), z.abs().max().item() if z.numel() else 0.0)
    torch.testing.assert_close(fast.double(), reference, rtol=1e-6, atol=1e-6 * scale)


log_uniform = st.floats(-8, 2).map(lambda e: 10.0 ** e)


@st.composite
def filter_inputs(draw, max_steps: int = 200):
    lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
    steps = draw(st.integers(1, max_steps))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    z = (draw(st.sampled_from([0.01, 1.0, 30.0])) * torch.randn(*lead, steps, generator=gen)).to(dtype)
    density = draw(st.sampled_from([None, 0.0, 0.3, 0.9, 1.0]))
    mask = None if density is None else torch.rand(*lead, steps, generator=gen) < density
    if mask is not None and draw(st.booleans()):  # right padding, the trainer's layout
        lengths = torch.randint(0, steps + 1, lead, generator=gen)
        mask = torch.arange(steps) < lengths.unsqueeze(-1)
    return z, mask, draw(log_uniform), draw(log_uniform), draw(st.floats(-1, 1)), draw(st.floats(0, 10))


@settings(max_examples=150, deadline=None)
@given(filter_inputs())
def test_vectorised_filter_equals_sequential_loop_on_random_shapes_masks_dtypes_and_q_r(inputs):
    assert_matches_reference(*inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("q, r", [(1e-6, 1.0), (1e-5, 1e-2), (1e-8, 1e2), (1e2, 1e-8), (1e-8, 1e-8), (1e2, 1e2)])
def test_long_sequences_with_extreme_q_r_neither_overflow_nor_underflow(q, r, dtype):
    gen = torch.Generator().manual_seed(0)
    z = (0.1 * torch.randn(2, 8192, generator=gen)).to(dtype)
    mask = torch.ones(2, 8192, dtype=torch.bool)
    mask[1, 6000:] = False
    mask[1, 100:300] = False  # an interior gap: the general (packing) path
    for p0 in (0.0, 1.0):
        assert_matches_reference(z, mask, q, r, 0.5, p0)


def test_masked_positions_are_skipped_so_a_row_filters_like_its_valid_tokens_packed_left():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(3, 50, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, 50, generator=gen) < 0.5
    out = kalman_filter(z, mask, q=1e-3, r=0.5, p0=0.2)
    for row in range(3):
        packed = kalman_filter(z[row, mask[row]], q=1e-3, r=0.5, p0=0.2)
        torch.testing.assert_close(out[row, mask[row]], packed, rtol=1e-12, atol=1e-12)
        assert (out[row, ~mask[row]] == 0).all()


def test_masked_observations_are_never_read():
    z = torch.randn(4, 100, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mask = torch.rand(4, 100, generator=torch.Generator().manual_seed(3)) < 0.7
    mask[0, 60:] = False
    right_padded = torch.arange(100) < torch.tensor([[10], [50], [100], [0]])
    for m in (mask, right_padded, mask.double(), right_padded.double()):  # a float mask multiplies: NaN * 0 is NaN
        for fill in (math.nan, math.inf):
            garbage = z.masked_fill(m == 0, fill)
            out = kalman_filter(garbage, m, q=1e-2, r=1.0)
            torch.testing.assert_close(out, kalman_filter(z, m, q=1e-2, r=1.0))
            assert (out[m == 0] == 0).all()


def test_filter_is_causal_and_restarts_per_row():
    z = torch.randn(2, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    changed = z.clone()
    changed[0, 200:] += 5.0
    a, b = kalman_filter(z, q=1e-4, r=1.0, p0=0.0), kalman_filter(changed, q=1e-4, r=1.0, p0=0.0)
    torch.testing.assert_close(a[0, :200], b[0, :200], rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


def test_all_masked_rows_empty_batches_and_length_one_sequences():
    z = torch.randn(3, 1)
    assert (kalman_filter(z, torch.zeros(3, 1), q=1.0, r=1.0) == 0).all()
    assert kalman_filter(torch.zeros(0, 7), q=1.0, r=1.0).shape == (0, 7)
    # one observation from P0: K_1 = (p0 + q) / (p0 + q + r)
    torch.testing.assert_close(kalman_filter(torch.tensor([2.0]), q=1.0, r=2.0, x0=0.0, p0=1.0), torch.tensor([1.0]))


def test_filter_detaches_and_keeps_low_precision_dtypes():
    z = torch.randn(2, 10, requires_grad=True)
    assert not kalman_filter(z, q=1.0, r=1.0).requires_grad
    assert kalman_filter(z.detach().bfloat16(), q=1.0, r=1.0).dtype == torch.bfloat16


def test_gains_for_krpo_defaults_and_g12_are_the_spec_table():
    gains, variances = kalman_gains(1e-5, 1e-2, 1.0, 12)
    assert gains.dtype == variances.dtype == torch.float64
    expected_gains = [0.9901, 0.4978, 0.3328, 0.2503]
    torch.testing.assert_close(gains[:4], torch.tensor(expected_gains, dtype=torch.float64), atol=5e-5, rtol=0)
    assert round(gains[-1].item(), 4) == 0.0867
    std = variances.sqrt()
    assert [round(std[0].item(), 4), round(std[1].item(), 4), round(std[-1].item(), 4)] == [0.0995, 0.0706, 0.0295]


def test_posterior_variance_equals_r_times_gain_and_cached_results_cannot_be_corrupted():
    gains, variances = kalman_gains(1e-6, 1.0, 0.0, 1000)
    torch.testing.assert_close(variances, 1.0 * gains, rtol=1e-12, atol=0)
    gains.zero_()
    assert kalman_gains(1e-6, 1.0, 0.0, 1000)[0][-1] > 0


@pytest.mark.parametrize("q", [1e-6, 1e-4])
def test_authors_float32_gains_are_their_closed_form_bit_for_bit(q):
    """Equal to the step-by-step float32 evaluation of the authors' formula at T = 4,096, and a gain does not depend
    on how many are asked for."""
    reference = torch.from_numpy(authors_gains_step_by_step(q, 1.0, 0.0, 4096)).double()
    for steps in (1, 37, 1000, 4096):
        gains, variances = kalman_gains(q, 1.0, 0.0, steps, gains="authors_float32")
        assert torch.equal(gains, reference[:steps]) and torch.equal(variances, gains)


@pytest.mark.parametrize("q, low, high", [(1e-6, 0.01, 0.03), (1e-4, 1e-4, 1e-3)])
def test_authors_float32_gains_drift_from_the_exact_ones_by_the_documented_amount(q, low, high):
    """docs/algorithms.md: up to 2.4% above the exact gain by token 4,096 at Q 1e-6, 0.06% at Q 1e-4."""
    exact = kalman_gains(q, 1.0, 0.0, 4096)[0]
    error = kalman_gains(q, 1.0, 0.0, 4096, gains="authors_float32")[0] / exact - 1
    assert low < error.abs().max().item() < high
    assert error[error.abs().argmax()] > 0


# the rescaled cumulative sum, and the chunked scan (past float32's RESCALE_RANGE; float64's is past the overflow)
@pytest.mark.parametrize("q, dtype, tolerance", [(1e-6, torch.float64, 1e-12), (1e-2, torch.float32, 1e-5)])
def test_the_filter_with_the_authors_gains_is_the_sequential_filter_with_those_gains(q, dtype, tolerance):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 500, generator=gen, dtype=dtype)
    mask = torch.rand(3, 500, generator=gen) < 0.8  # gaps: each row's n-th valid token takes K_n
    gains = kalman_gains(q, 1.0, 0.0, 500, gains="authors_float32")[0]
    fast = kalman_filter(z, mask, q=q, r=1.0, x0=0.0, p0=0.0, gains="authors_float32")
    reference = sequential_filter(z, mask, q, 1.0, 0.0, 0.0, gains=gains)
    torch.testing.assert_close(fast.double(), reference, rtol=tolerance, atol=tolerance)


def test_unknown_gains_and_overflowing_authors_gains_are_refused():
    with pytest.raises(ValueError, match="unknown Kalman gains 'float32'"):
        kalman_filter(torch.zeros(1, 3), q=1.0, r=1.0, gains="float32")
    with pytest.raises(ValueError, match="authors' float32 gains overflow"):  # sinh(t eta) > 3.4e38 for t > 92
        kalman_gains(1.0, 1.0, 0.0, 100, gains="authors_float32")


@pytest.mark.parametrize("q, r, p0", [(-1.0, 1.0, 0.0), (1.0, 0.0, 0.0), (1.0, 1.0, -1.0), (math.inf, 1.0, 0.0)])
def test_invalid_noise_parameters_are_refused(q, r, p0):
    with pytest.raises(ValueError, match="q >= 0, r > 0, p0 >= 0"):
        kalman_filter(torch.zeros(1, 3), q=q, r=r, p0=p0)


def test_mask_of_another_shape_is_refused():
    with pytest.raises(ValueError, match="mask shape"):
        kalman_filter(torch.zeros(2, 3), torch.ones(2, 4), q=1.0, r=1.0)
