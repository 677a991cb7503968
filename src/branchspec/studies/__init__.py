"""Studies: each one trains and/or analyses, and writes a run directory (config, metrics, figures, report)."""
