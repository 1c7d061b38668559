"""Compute kernels shipped with retention: `metal/` (MLX, Metal sources) and `triton/` (CUDA).

Imported as `retention.kernels`; each backend imports its kernels lazily, so importing this
package costs nothing and needs neither torch nor triton.
"""
