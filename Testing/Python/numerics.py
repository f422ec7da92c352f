"""Comparing numbers whose last bits depend on the machine.

float32 convolutions give other last bits on another instruction set (oneDNN and ATen pick AVX-512, AVX2 or
SSE kernels at run time) or with another thread count (reductions split differently), and training steps
amplify them: Adam's normalised steps turn a near-zero gradient's rounding into a step of the learning rate.
A feature that is near zero then differs by a large *relative* amount while it moved by a tiny share of what
the feature does across patients and structures. So a comparison of such numbers across processes or with a
frozen reference uses a tolerance relative to each column's spread over the table (:func:`assert_close_to_spread`),
never to the value itself; a real change (another pooling, a wrong channel order) moves a column by a large
share of its spread.

To see what another CPU does on this one: ``ONEDNN_MAX_CPU_ISA=SSE41 ATEN_CPU_CAPABILITY=default
NPY_DISABLE_CPU_FEATURES="X86_V3 X86_V4 AVX512_ICL"`` (an x86-64 without AVX2) or ``ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2`` (one without AVX-512).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def column_spread(expected: pd.DataFrame) -> pd.Series:
    """Each column's scale: its standard deviation over the rows (its largest magnitude when it is constant)."""
    values = expected.astype(float)
    spread = values.std(ddof=0)
    return spread.where(spread > 0, values.abs().max())


def assert_close_to_spread(actual: pd.DataFrame, expected: pd.DataFrame, share: float, what: str = "") -> None:
    """Same rows and columns, in the same order, and every value within ``share`` of its column's spread
    (:func:`column_spread` of ``expected``); the message names the worst cell and its tolerance."""
    assert list(actual.columns) == list(expected.columns), f"{what}: columns differ"
    assert list(actual.index) == list(expected.index), f"{what}: rows differ"
    tolerance = share * column_spread(expected)
    excess = ((actual.astype(float) - expected.astype(float)).abs() - tolerance).fillna(np.inf)
    both_missing = actual.isna() & expected.isna()
    excess = excess.mask(both_missing, -np.inf)
    if (excess > 0).any().any():
        column = excess.max().idxmax()
        row = excess[column].idxmax()
        raise AssertionError(
            f"{what}: {column} of {row} is {float(actual.at[row, column]):.6g}, expected "
            f"{float(expected.at[row, column]):.6g} "
            f"within {tolerance[column]:.3g} ({share:g} of the column's spread {tolerance[column] / share:.3g})"
        )
