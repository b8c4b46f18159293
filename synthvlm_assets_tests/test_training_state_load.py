"""Training state from the shared storage root is loaded with torch.load(weights_only=True) (issue 17)."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from synthvlm_assets.training.loop import _rng_state, _set_rng_state, torch_bytes, torch_load

SIDE_EFFECTS: list[str] = []


def _record(tag: str) -> None:
    SIDE_EFFECTS.append(tag)


class Payload:
    """What a hostile trainer_state.pt would hold: unpickling it calls a function of the attacker's choosing."""

    def __reduce__(self):
        return (_record, ("ran",))


def test_a_pickle_that_would_run_code_is_refused():
    data = torch_bytes({"step": 3, "losses": [1.0], "evil": Payload()})
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        torch_load(data)
    assert SIDE_EFFECTS == []


def test_optimizer_scheduler_and_rng_state_round_trip():
    from transformers import get_cosine_schedule_with_warmup

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
    scheduler = get_cosine_schedule_with_warmup(optimizer, 2, 10)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step(), scheduler.step()
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": 1, "losses": [0.5]}
    loaded = torch_load(torch_bytes(state))
    assert loaded["scheduler"] == scheduler.state_dict() and loaded["losses"] == [0.5]
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])

    import random

    import numpy as np

    saved = torch_bytes(_rng_state())
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    _set_rng_state(torch_load(saved))
    got = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    assert all(math.isclose(a, b) for a, b in zip(got, expected))
