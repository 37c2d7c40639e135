"""Device meshes, logical-axis rules, and the shardings of state and batches."""
