"""tools.spec_cost's round floor: the bound behind its 'ceiling' lines, on hand-made part costs."""

from __future__ import annotations

import pytest

from tools.spec_cost import round_floor


def test_round_floor_is_verify_plus_cheapest_mtp_passes():
    costs = {
        "model forward L=1": 4.0,
        "model forward L=2": 4.4,
        "model forward L=3": 5.2,
        "MTP pass L=1": 1.2,
        "MTP pass L=2": 1.0,  # timing noise: the cheaper measurement stands in for L=1
        "norm+lm_head+argmax L=1": 0.2,
    }
    assert round_floor(costs, 1) == pytest.approx((4.4 + 1.0) / 4.0)
    assert round_floor(costs, 2) == pytest.approx((5.2 + 2 * 1.0) / 4.0)
    assert round_floor(costs, 3) is None  # forward L=4 not measured
    no_mtp = {k: v for k, v in costs.items() if not k.startswith("MTP")}
    assert round_floor(no_mtp, 1) is None
