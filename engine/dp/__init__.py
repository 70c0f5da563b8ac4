"""Data parallelism: N engine replicas on Ray behind one router (docs/ray.md)."""
