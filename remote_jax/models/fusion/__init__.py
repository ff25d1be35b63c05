"""Fusion blocks for the multilevel "MOT" slots (design.md section 3).

`FUSIONS[variant](cfg, dim, name) -> nn.Module`, called as
`block(query (B,n,D), query_mask (B,n) bool, source (B,m,D), source_mask (B,m) bool,
deterministic) -> (out (B,n,D), diag)`. `cfg` is the flat `config.model.mot`
dict; each variant reads the keys it needs and ignores the rest.

- ot_paper: paper eqs. 5-8 through ott-jax (research knobs: cost, tau_a/tau_b,
  eps_init/eps_decay, diff, solver).
- ot_reference: the released code's degenerate-in-practice OT residual.
- xattn: the cross-attention ablation. none: identity.
"""
from remote_jax.models.fusion import none, ot, xattn
from remote_jax.models.fusion.none import FIELD

FUSIONS = {
    "ot_paper": ot.build_paper,
    "ot_reference": ot.build_reference,
    "xattn": xattn.build,
    "none": none.build,
}


def make_fusion(cfg, dim: int, name: str = "mot"):
  """Build the block named by cfg["variant"]."""
  variant = cfg.get("variant")
  if variant not in FUSIONS:
    raise ValueError(f"{FIELD}.variant={variant!r}: allowed values are {sorted(FUSIONS)}")
  return FUSIONS[variant](cfg, dim, name)
