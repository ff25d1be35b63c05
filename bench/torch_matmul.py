"""PyTorch's matmul rate on this machine (JSON), to calibrate perf_reference.md.

perf_reference.md measured the released code on a CPU whose float32 matmul
peak under PyTorch was about 300 GFLOP/s. Our machines are not all alike, so
before comparing our step times with its figures, measure PyTorch here (the
same 4096^3 matmul as bench.model_step's XLA peak, same threads, best of 5;
smaller where a dtype is emulated and slow).
torch is not a dependency of ours: run it from its own environment,

  python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.13.0 numpy
  /tmp/tv/bin/python bench/torch_matmul.py

and scale the released figures by this peak over 300 (an estimate: it
assumes the released code keeps its fraction of the peak).
"""
import json
import os
import time


def best_seconds(torch, dtype, n, reps):
  a = torch.ones((n, n), dtype=dtype)
  torch.mm(a, a)
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    torch.mm(a, a)
    best = min(best, time.perf_counter() - t)
  return best


def peak_gflops(torch, dtype, n=4096, reps=5, budget_s=4.0):
  """(GFLOP/s, size used). CPUs without bf16 instructions emulate it at under
  1 GFLOP/s (a 4096^3 bf16 matmul would take minutes), so the size grows from
  512 only while one matmul stays within budget_s."""
  size = 512
  while size < n and best_seconds(torch, dtype, size, 1) * 8 <= budget_s:
    size *= 2
  return 2 * size ** 3 / best_seconds(torch, dtype, size, reps) / 1e9, size


def main():
  import torch
  torch.set_num_threads(os.cpu_count())
  out = {"torch": torch.__version__, "threads": torch.get_num_threads()}
  for name in ("float32", "bfloat16"):
    gflops, n = peak_gflops(torch, getattr(torch, name))
    out[f"{name}_gflops"], out[f"{name}_n"] = round(gflops, 1), n
  out["released_step_scale_vs_perf_reference"] = round(300 / out["float32_gflops"], 3)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
