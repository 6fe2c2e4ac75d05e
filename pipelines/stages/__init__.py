"""One script per DVC stage: read params, call tlflax, write outputs."""
