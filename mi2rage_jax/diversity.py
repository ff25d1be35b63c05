"""Diversity of a view set: generalised variance of a GMM (paper supplement S8).

Procedure (`generalized_variance`):
  1. features X (n, d) of the views (from a feature extractor; see pipeline);
  2. PCA to D_PCA dimensions: centre X, project on the top D_PCA right singular
     vectors (no whitening, so variances keep their scale);
  3. fit an N-component Gaussian mixture with DIAGONAL covariances by EM
     (k-means++ initialisation from a fixed seed, `reg` added to variances);
  4. with weights p_i, means u_i, covariances S_i and u_bar = sum_i p_i u_i, the
     law of total variance gives the mixture covariance (eq. 22)
        Var(X) = sum_i p_i S_i + sum_i p_i (u_i - u_bar)(u_i - u_bar)^T,
     and the generalised variance is its determinant (eq. 23)
        sigma^2 = det(Var(X)).
  The log-determinant is returned alongside (the determinant over/underflows
  easily: the paper reports values like 1e21 at D_PCA = 32).
Paper settings: D_PCA in {16, 32, 64}, N in {1, 3, 5}; Table 3 uses 32 and 3.
"""
from __future__ import annotations

import numpy as np


def mixture_covariance(weights, means, covs) -> np.ndarray:
  """Eq. 22. covs: (N, D) diagonal variances or (N, D, D) full matrices."""
  w = np.asarray(weights, np.float64)
  mu = np.asarray(means, np.float64)
  covs = np.asarray(covs, np.float64)
  if covs.ndim == 2:
    covs = np.einsum("nd,de->nde", covs, np.eye(covs.shape[1]))
  w = w / w.sum()
  ubar = w @ mu
  dev = mu - ubar
  return np.einsum("n,nde->de", w, covs) + np.einsum("n,nd,ne->de", w, dev, dev)


def mixture_generalized_variance(weights, means, covs):
  """(det, logdet) of the mixture covariance (eq. 23)."""
  sign, logdet = np.linalg.slogdet(mixture_covariance(weights, means, covs))
  if sign <= 0:
    raise ValueError("mixture covariance is not positive definite")
  return float(np.exp(logdet)), float(logdet)


def pca(x, dim: int):
  """Centred projection of x (n, d) on its top `dim` principal directions."""
  x = np.asarray(x, np.float64)
  dim = min(dim, x.shape[1], x.shape[0])
  xc = x - x.mean(0)
  _, _, vt = np.linalg.svd(xc, full_matrices=False)
  return xc @ vt[:dim].T


def _kmeanspp(x, k, rng):
  centers = [x[rng.integers(len(x))]]
  for _ in range(1, k):
    d2 = np.min(((x[:, None] - np.asarray(centers)[None]) ** 2).sum(-1), 1)
    p = d2 / d2.sum() if d2.sum() > 0 else None
    centers.append(x[rng.choice(len(x), p=p)])
  return np.asarray(centers)


def fit_gmm_diag(x, n_components: int, seed: int = 0, iters: int = 200,
                 tol: float = 1e-8, reg: float = 1e-6):
  """EM for a diagonal-covariance GMM. Returns (weights, means, variances, loglik)."""
  x = np.asarray(x, np.float64)
  n = x.shape[0]
  k = min(n_components, n)
  rng = np.random.default_rng(seed)
  mu = _kmeanspp(x, k, rng)
  var = np.tile(x.var(0) + reg, (k, 1))
  w = np.full(k, 1.0 / k)
  prev = -np.inf
  ll = prev
  for _ in range(iters):
    # E step: log N(x | mu_k, diag var_k) + log w_k.
    logp = (-0.5 * (((x[:, None] - mu[None]) ** 2) / var[None]).sum(-1)
            - 0.5 * np.log(2 * np.pi * var).sum(-1)[None] + np.log(w)[None])
    m = logp.max(1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logp - m).sum(1))
    resp = np.exp(logp - lse[:, None])
    ll = lse.mean()
    # M step.
    nk = resp.sum(0) + 1e-12
    w = nk / n
    mu = (resp.T @ x) / nk[:, None]
    var = (resp.T @ (x * x)) / nk[:, None] - mu * mu + reg
    var = np.maximum(var, reg)
    if abs(ll - prev) < tol * max(1.0, abs(ll)):
      break
    prev = ll
  return w, mu, var, float(ll)


def generalized_variance(features, pca_dim: int = 32, n_components: int = 3, seed: int = 0):
  """The paper's diversity estimate. Returns dict(det, logdet, log10, dim, components)."""
  z = pca(features, pca_dim)
  w, mu, var, ll = fit_gmm_diag(z, n_components, seed=seed)
  det, logdet = mixture_generalized_variance(w, mu, var)
  return {"det": det, "logdet": logdet, "log10": logdet / np.log(10.0),
          "dim": int(z.shape[1]), "components": len(w), "loglik": ll,
          "n": int(z.shape[0])}
