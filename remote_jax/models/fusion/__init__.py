"""Fusion blocks for the multilevel "MOT" slots (design.md section 3).

`FUSIONS[variant](cfg, dim, name) -> nn.Module`, called as
`block(query (B,n,D), query_mask (B,n) bool, source (B,m,D), source_mask (B,m) bool,
deterministic) -> (out (B,n,D), diag)`. `cfg` is the flat `config.model.mot`
dict; each variant reads the keys it needs and ignores the rest.

- ot_paper: paper eqs. 5-8 through ott-jax (research knobs: cost, tau_a/tau_b,
  eps_init/eps_decay, diff, solver).
- ot_reference: the released code's degenerate-in-practice OT residual.
- xattn: the cross-attention ablation. none: identity.
- Controls that share ot_paper's parameters (issue 34): uniform (the uniform plan),
  skip (a same-position skip from the lower levels), detached (the plan under
  stop_gradient). Research variants: fgw (fused Gromov-Wasserstein), sdiv (no fusion; a
  Sinkhorn-divergence training loss). docs/ot_variants.md says what each isolates and how
  to add one.

A block may return `diag["aux_loss"]` (a scalar): the model adds it to the training loss.
"""
from remote_jax.models.fusion import detached, fgw, none, ot, sdiv, skip, uniform, xattn
from remote_jax.models.fusion.none import FIELD

FUSIONS = {
    "ot_paper": ot.build_paper,
    "ot_reference": ot.build_reference,
    "xattn": xattn.build,
    "none": none.build,
    "uniform": uniform.build,
    "skip": skip.build,
    "detached": detached.build,
    "fgw": fgw.build,
    "sdiv": sdiv.build,
}


def make_fusion(cfg, dim: int, name: str = "mot"):
  """Build the block named by cfg["variant"]."""
  variant = cfg.get("variant")
  if variant not in FUSIONS:
    raise ValueError(f"{FIELD}.variant={variant!r}: allowed values are {sorted(FUSIONS)}")
  return FUSIONS[variant](cfg, dim, name)
