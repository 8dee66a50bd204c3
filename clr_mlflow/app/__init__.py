"""Applications on top of the public API: the CLI, its config, the runner, compare/reproduce, sweeps, resume."""
