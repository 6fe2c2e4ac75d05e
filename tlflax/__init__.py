"""tlflax: transfer learning and fine-tuning on JAX/Flax (the library; no Prefect, no DVC)."""
