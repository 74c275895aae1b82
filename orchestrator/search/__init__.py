"""``orchestrator search``: trials of a job over a search space on Ray Tune (command.py; the design in docs/search.md)."""
