"""Datasets: TFDS builders and readers, manifests, subsets, the input pipeline."""
