"""bench/model_step.py builds the tiny model through the engine and times a step (no test
ran it, so a config field it read vanished unnoticed once)."""
import pytest


@pytest.mark.slow   # two compiles of the tiny model
def test_one_step_of_the_tiny_model():
  from bench import model_step
  out = model_step.run_one("tiny", "paper", batch=2, length=16, objects=2, crop=32, steps=2,
                           dtype="float32", remat=False, mot="", diff="", classes=5)
  assert out["mot"] == "ot_paper" and out["classes"] == 5
  assert out["train_step_s"] > 0 and out["samples_per_s"] > 0 and out["params_m"] > 0
