"""Pipeline parallelism: contiguous layer ranges as Ray actors (docs/ray.md)."""
