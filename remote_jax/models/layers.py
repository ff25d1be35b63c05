"""Small shared pieces: PyTorch-style initialisers, a Dense that uses them,
masked pooling and a multi-head cross-attention with a key mask.

The released REMOTE code initialises every new layer the PyTorch way
(reference_remote.md 3.1): Linear weights and biases ~ U(+-1/sqrt(fan_in)),
and `xavier_uniform` on 3-D expert tensors with torch's fan convention.
"""
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# config.model.dtype -> the compute dtype (remote.py, moe.py).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def uniform_init(bound: float) -> Callable:
  """U(-bound, bound)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def torch_linear_init(fan_in: int, axes: tuple[str, str] | None = None):
  """(kernel_init, bias_init) of torch.nn.Linear: both U(+-1/sqrt(fan_in)).

  The bias bound depends on fan_in, which Flax's bias_init never sees, hence
  the argument. With `axes` (kernel's logical axes) both come partitioned.
  """
  kernel_init = bias_init = uniform_init(1.0 / math.sqrt(fan_in))
  if axes is None:
    return kernel_init, bias_init
  return (nn.with_logical_partitioning(kernel_init, axes),
          nn.with_logical_partitioning(bias_init, axes[-1:]))


def torch_xavier_uniform(key, shape, dtype=jnp.float32):
  """torch.nn.init.xavier_uniform_ for any rank >= 2, with torch's fans.

  For a 3-D (E, n, m) tensor torch takes fan_in = n*m and fan_out = E*m (dim 1
  and dim 0 times the "receptive field" m), which makes the released experts
  start tiny (bounds ~2e-3 at E=13, D=768): the MoE begins as a weighted identity.
  """
  receptive = math.prod(shape[2:])
  fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
  return uniform_init(math.sqrt(6.0 / (fan_in + fan_out)))(key, shape, dtype)


def layer_norm(epsilon: float, dtype: Dtype, param_dtype: Dtype, name: str):
  return nn.LayerNorm(
      epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def _accumulating_dot(lhs, rhs, dims):
  return jax.lax.dot_general(lhs, rhs, dims, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _matmul_f32_accumulate(lhs, rhs):
  """(M, K) @ (K, N) on low-precision operands, float32 accumulation, result
  in the operands' dtype; the backward's two matmuls likewise."""
  return _accumulating_dot(lhs, rhs, (((1,), (0,)), ((), ()))).astype(lhs.dtype)


def _matmul_fwd(lhs, rhs):
  return _matmul_f32_accumulate(lhs, rhs), (lhs, rhs)


def _matmul_bwd(res, ct):
  lhs, rhs = res
  ct = ct.astype(lhs.dtype)
  d_lhs = _accumulating_dot(ct, rhs, (((1,), (1,)), ((), ())))   # ct @ rhs^T
  d_rhs = _accumulating_dot(lhs, ct, (((0,), (0,)), ((), ())))   # lhs^T @ ct
  return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype)


_matmul_f32_accumulate.defvjp(_matmul_fwd, _matmul_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """lax.dot_general for Dense layers that keeps bfloat16 matmuls native.

  With bf16 operands lax.dot_general returns bf16, which XLA:CPU computes by
  converting both operands to float32 (half the speed of its native
  bf16 x bf16 -> f32 kernels); its autodiff transposes do the same. Here the
  Dense contraction (lhs trailing axes with rhs leading axes, no batch axes)
  runs as one (M, K) @ (K, N) matmul with float32 accumulation in the forward
  and backward passes, cast back to bf16: what GPUs and TPUs do anyway.
  float32 operands and any other contraction go straight to lax.dot_general.
  """
  (lc, rc), (lb, rb) = dimension_numbers
  lc, rc = tuple(a % lhs.ndim for a in lc), tuple(a % rhs.ndim for a in rc)
  k = len(lc)
  dense_like = (not lb and not rb and lhs.dtype == rhs.dtype == jnp.bfloat16
                and preferred_element_type in (None, jnp.bfloat16)
                and lc == tuple(range(lhs.ndim - k, lhs.ndim)) and rc == tuple(range(k)))
  if not dense_like:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  out_shape = lhs.shape[:lhs.ndim - k] + rhs.shape[k:]
  contract = math.prod(rhs.shape[:k])
  out = _matmul_f32_accumulate(lhs.reshape(-1, contract), rhs.reshape(contract, -1))
  return out.reshape(out_shape)


class TorchDense(nn.Module):
  """nn.Dense with torch.nn.Linear's default init and logical axis names."""
  features: int
  kernel_axes: tuple[str, str] = ("embed", "mlp")
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    kernel_init, bias_init = torch_linear_init(fan_in, self.kernel_axes)
    kernel = self.param("kernel", kernel_init, (fan_in, self.features),
                        self.param_dtype)
    y = dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                    (((x.ndim - 1,), (0,)), ((), ())))
    if self.use_bias:
      bias = self.param("bias", bias_init, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def masked_mean(x, mask, axis: int = 1):
  """Mean of x over `axis` counting only mask==True rows; 0 where none is valid."""
  m = mask.astype(x.dtype)[..., None]
  total = jnp.sum(x * m, axis=axis)
  count = jnp.maximum(jnp.sum(m, axis=axis), 1.0)
  return total / count


def gather_rows(x, index):
  """x (B,N,D), index (B,) -> (B,D): x[b, index[b]], zeros where index < 0.

  Out-of-range indices are clamped (only reachable under jit; see
  heads.validate_indices).
  """
  safe = jnp.clip(index, 0, x.shape[1] - 1)
  rows = jnp.take_along_axis(x, safe[:, None, None], axis=1)[:, 0]
  return jnp.where((index >= 0)[:, None], rows, jnp.zeros_like(rows))


def quick_gelu(x):
  """CLIP's activation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x):
  return nn.gelu(x, approximate=False)


ACTIVATIONS = {"gelu": exact_gelu, "quick_gelu": quick_gelu, "relu": nn.relu}


class MultiHeadCrossAttention(nn.Module):
  """Queries attend keys/values from another sequence, with a key mask.

  Call: (query (B,n,D), source (B,m,D), source_mask (B,m) bool | None,
  deterministic) -> (B,n,D). Scores are scaled by 1/sqrt(head_dim). Masked keys
  get zero probability; a query row whose keys are all masked returns zeros
  before the output projection (instead of NaN or an average over padding).
  `out_proj=False` gives the paper's eqs. 9-10 (F = A H, no output matrix).
  """
  num_heads: int
  use_bias: bool = True
  out_proj: bool = True
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query, source, source_mask=None, deterministic=True):
    b, n, d = query.shape
    m = source.shape[1]
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by num_heads={self.num_heads}")
    head_dim = d // self.num_heads
    dense = lambda name, axes: TorchDense(
        d, kernel_axes=axes, use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)
    q = dense("query", ("embed", "joined_kv"))(query).reshape(b, n, self.num_heads, head_dim)
    k = dense("key", ("embed", "joined_kv"))(source).reshape(b, m, self.num_heads, head_dim)
    v = dense("value", ("embed", "joined_kv"))(source).reshape(b, m, self.num_heads, head_dim)
    scores = jnp.einsum("bnhk,bmhk->bhnm", q, k).astype(jnp.float32)
    scores = scores / math.sqrt(head_dim)
    if source_mask is not None:
      keep = source_mask[:, None, None, :]
      scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(scores, axis=-1) * keep   # all-masked rows -> 0
    else:
      probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(self.dropout_rate)(probs, deterministic=deterministic)
    out = jnp.einsum("bhnm,bmhk->bnhk", probs.astype(self.dtype), v).reshape(b, n, d)
    if self.out_proj:
      out = dense("out", ("joined_kv", "embed"))(out)
    return out
