"""Conformance kit: checks a runner against the six launch-contract invariants with real probes.

`kit.run_conformance(runner_path, work_dir)` runs everything and returns the results; `probes.py`
is the stdlib-only program launched through the runner; `listeners.py` holds the recording
loopback listeners; `judge.py` turns observations into pass/fail."""
