"""bench/fk_predictiveness.py: the within-prompt AUC it reports, checked on hand-made cases."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
from fk_predictiveness import within_prompt_auc  # noqa: E402


def test_auc_counts_only_pairs_within_a_prompt():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.0, 1.0, 1.0]])
    passed = torch.tensor([[True, False, False], [True, False, False]])
    auc, pairs = within_prompt_auc(scores, passed)
    # prompt 0: the passing particle beats both; prompt 1: it loses to both (across prompts 0.9 > 0.0 is not counted)
    assert pairs == 4
    assert auc == pytest.approx(0.5)


def test_auc_is_one_for_a_perfect_guide_and_ties_count_half():
    passed = torch.tensor([[True, True, False, False]])
    assert within_prompt_auc(torch.tensor([[0.8, 0.7, 0.2, 0.1]]), passed) == (1.0, 4)
    assert within_prompt_auc(torch.tensor([[0.5, 0.5, 0.5, 0.5]]), passed) == (0.5, 4)


def test_auc_is_nan_without_mixed_prompts():
    auc, pairs = within_prompt_auc(torch.rand(3, 4), torch.ones(3, 4, dtype=torch.bool))
    assert pairs == 0 and auc != auc


def test_guide_scores_records_every_guide_and_returns_the_first():
    from diffaccel.rewards import FunctionReward
    from fk_predictiveness import GuideScores

    bright = FunctionReward(lambda x, p: x.mean(dim=(1, 2, 3)), name="bright")
    red = FunctionReward(lambda x, p: x[:, 0].mean(dim=(1, 2)), name="red")
    scorer = GuideScores({"bright": bright, "red": red})
    images = torch.zeros(2, 3, 4, 4)
    images[0, 0] = 1.0
    assert torch.allclose(scorer(images, "a red square"), torch.tensor([1 / 3, 0.0]))
    assert torch.allclose(scorer.history["red"][0], torch.tensor([1.0, 0.0]))
    assert scorer.name == "bright" and len(scorer.history["bright"]) == 1


def test_load_sets_ddim_eta_and_refuses_it_elsewhere():
    from steering import load

    _, call = load(None, "sd", "cpu", eta=0.5)
    assert call["eta"] == 0.5
    with pytest.raises(ValueError, match="DDIM"):
        load(None, "flux", "cpu", eta=0.5)
