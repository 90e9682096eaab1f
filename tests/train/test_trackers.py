"""train.trackers: offline defaults that stay within the run, and one callback for every tracker."""

from __future__ import annotations

import os

import pytest

from train.trackers import eval_metrics, offline_environment

TRACKER_ENV = ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI")


def test_wandb_runs_offline_and_mlflow_writes_into_the_run_unless_the_user_says_otherwise(tmp_path, monkeypatch):
    for key in TRACKER_ENV:
        monkeypatch.delenv(key, raising=False)
    run = tmp_path / "runs" / "r"
    with offline_environment(["wandb", "mlflow"], run):
        assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_DIR"] == str(run)
        assert os.environ["MLFLOW_TRACKING_URI"] == (run / "mlruns").as_uri()
    assert not any(key in os.environ for key in TRACKER_ENV)  # the next run gets its own directories

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    with offline_environment(["wandb", "mlflow"], run):
        assert os.environ["WANDB_MODE"] == "online"
        assert os.environ["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"
    assert os.environ["WANDB_MODE"] == "online"  # the user's own settings are left as they were
    with offline_environment(["tensorboard"], run):
        assert "WANDB_DIR" not in os.environ and os.environ["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"


@pytest.mark.parametrize("scores,expected", [
    ({"metric": "regex", "tuned": 75.0, "n": 4}, {"eval_regex": 75.0}),
    ({"metric": "exact_match", "tuned": 99.5, "base": 0.5, "gain_points": 99.0},
     {"eval_exact_match": 99.5, "eval_exact_match_base": 0.5, "eval_exact_match_gain_points": 99.0}),
])
def test_eval_scores_become_tracker_metrics(scores, expected):
    assert eval_metrics(scores) == expected
