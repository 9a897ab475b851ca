"""Training: the loop, the jobs (expert, router, monolith) and training one job on this machine.
Imports ``router``, ``data`` and ``experts``; never ``swarm`` or ``evaluation``."""
