"""Bottom layer: errors, atomic file writes, seeding, progress, markdown tables, plots, names."""
