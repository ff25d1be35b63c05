"""MI2RAGE selection, test-time criteria and the diversity estimate (numpy only)."""
import numpy as np
import pytest

from mi2rage_jax import diversity, selection


def test_num_kept_matches_paper_counts():
  assert selection.num_kept(30, 0.6) == 18
  assert selection.num_kept(90, 0.6) == 54
  assert selection.num_kept(5, 0.6) == 3
  assert selection.num_kept(1, 0.6) == 1
  assert selection.num_kept(4, 1.0) == 4
  with pytest.raises(ValueError):
    selection.num_kept(4, 0.0)


def test_selection_keeps_exactly_the_lowest_loss_fraction_per_instance():
  rng = np.random.default_rng(0)
  scores = {f"train/{i}": rng.normal(size=n) for i, n in enumerate([5, 30, 90, 7])}
  kept = selection.select_fraction(scores, 0.6)
  for iid, s in scores.items():
    k = selection.num_kept(len(s), 0.6)
    assert len(kept[iid]) == k
    assert list(kept[iid]) == sorted(kept[iid])          # returned in index order
    rest = np.setdiff1d(np.arange(len(s)), kept[iid])
    assert s[kept[iid]].max() < s[rest].min()             # exactly the lowest ones


def test_selection_ties_broken_by_view_index_and_deterministic():
  scores = {"a": np.array([1.0, 0.5, 1.0, 0.5, 1.0, 2.0]), "b": np.zeros(5)}
  kept = selection.select_fraction(scores, 0.5)
  assert list(kept["a"]) == [0, 1, 3]      # both 0.5s, then the first 1.0 (index 0)
  assert list(kept["b"]) == [0, 1, 2]      # round(2.5) = 3, earliest indices
  assert all((selection.select_fraction(scores, 0.5)[k] == v).all() for k, v in kept.items())
  top = selection.select_top({"a": scores["a"]}, 4)["a"]
  assert list(top) == [1, 3, 0, 2]         # ascending score, ties by index


def test_selection_refuses_nan():
  with pytest.raises(ValueError, match="NaN"):
    selection.select_fraction({"a": np.array([0.1, np.nan])}, 0.5)


def test_label_free_criteria():
  logits = np.array([[4.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 2.0, 0.0]])
  maxprob = selection.SCORES["maxprob"](logits)
  entropy = selection.SCORES["entropy"](logits)
  assert np.argsort(maxprob).tolist() == [0, 2, 1]        # most confident first
  assert np.argsort(entropy).tolist() == [0, 2, 1]
  np.testing.assert_allclose(entropy[1], np.log(3), rtol=1e-9)
  # maxprob score = loss against the teacher's own prediction, independent of the label.
  np.testing.assert_allclose(maxprob, selection.loss_score(logits, logits.argmax(-1)))
  np.testing.assert_allclose(selection.SCORES["maxprob"](logits, np.array([2, 2, 2])), maxprob)


def test_agree_ranks_views_by_the_consensus_of_their_instance():
  # Instance 0: three views say class 1 (one mildly), one says class 0 with the highest
  # confidence of all (a confident wrong view). Instance 1: two views say class 2.
  logits = np.array([[0.0, 3.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.5, 0.0], [6.0, 0.0, 0.0],
                     [0.0, 0.0, 2.0], [1.0, 0.0, 3.0]])
  groups = np.array([0, 0, 0, 0, 1, 1])
  assert selection.consensus_labels(logits, groups).tolist() == [1, 1, 1, 1, 2, 2]
  agree = selection.score("agree", logits, groups=groups)
  np.testing.assert_allclose(agree, selection.loss_score(logits, [1, 1, 1, 1, 2, 2]))
  assert np.argsort(agree[:4]).tolist() == [0, 1, 2, 3]   # the contradicting view last
  assert np.argsort(selection.score("maxprob", logits)[:4])[0] == 3   # maxprob: it first
  # Groups are labels, not positions: permuting the rows permutes the scores.
  perm = np.array([5, 2, 0, 4, 3, 1])
  np.testing.assert_allclose(selection.score("agree", logits[perm], groups=groups[perm]),
                             agree[perm])
  # The true labels are never read.
  np.testing.assert_allclose(selection.score("agree", logits, np.zeros(6, int), groups), agree)
  with pytest.raises(ValueError, match="groups"):
    selection.score("agree", logits)


def test_mixture_covariance_closed_form():
  w = np.array([0.2, 0.3, 0.5])
  mu = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 20.0]])
  var = np.array([[1.0, 2.0], [3.0, 0.5], [2.0, 2.0]])
  ubar = w @ mu
  expect = sum(w[i] * (np.diag(var[i]) + np.outer(mu[i] - ubar, mu[i] - ubar)) for i in range(3))
  np.testing.assert_allclose(diversity.mixture_covariance(w, mu, var), expect)
  det, logdet = diversity.mixture_generalized_variance(w, mu, var)
  np.testing.assert_allclose(det, np.linalg.det(expect), rtol=1e-10)
  np.testing.assert_allclose(logdet, np.log(np.linalg.det(expect)), rtol=1e-10)


def test_generalized_variance_recovers_known_mixture():
  rng = np.random.default_rng(0)
  w = np.array([0.25, 0.35, 0.4])
  mu = np.array([[0.0, 0.0, 0.0], [40.0, 0.0, 5.0], [0.0, 40.0, -5.0]])
  sd = np.array([[1.0, 2.0, 0.5], [1.5, 0.7, 1.0], [0.8, 1.2, 2.0]])
  n = 30000
  comp = rng.choice(3, size=n, p=w)
  x = mu[comp] + sd[comp] * rng.normal(size=(n, 3))
  _, expect = diversity.mixture_generalized_variance(w, mu, sd ** 2)
  # PCA to the full dimension is a rotation: the determinant is unchanged.
  got = diversity.generalized_variance(x, pca_dim=3, n_components=3, seed=0)
  assert got["dim"] == 3 and got["components"] == 3
  np.testing.assert_allclose(got["logdet"], expect, atol=0.03)   # 3% in the determinant
  wf, _, _, _ = diversity.fit_gmm_diag(x, 3, seed=0)
  order = np.argsort(wf)
  np.testing.assert_allclose(wf[order], np.sort(w), atol=0.01)


def test_pca_keeps_top_directions_and_variance():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(5000, 6)) * np.array([10.0, 5.0, 1.0, 0.1, 0.1, 0.1])
  z = diversity.pca(x, 2)
  np.testing.assert_allclose(z.var(0), [100.0, 25.0], rtol=0.05)


def test_every_test_criterion_is_a_label_free_score():
  """config.TEST_CRITERIA (what resolve accepts for teacher.test_criterion) names scores
  that exist, and none reads the label; "real" is the pipeline's (the teacher's reading of
  the real view), not a score."""
  from remote_jax import config as config_lib
  scores = set(config_lib.TEST_CRITERIA) - {"real"}
  assert scores and scores <= set(selection.SCORES) and "loss" not in scores
