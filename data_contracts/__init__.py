"""The shipped Great Expectations suites, one per row format (alpaca.json, messages.json, prompt_completion.json).

A package only so that the suites install with the pipeline as package data: tasks/lib/contracts.py finds them
through importlib.resources, from a checkout and from an installed wheel alike."""
