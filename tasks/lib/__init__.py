"""The library the stage tasks use: no Prefect task is defined in here."""
