"""``python -m fastloc.probe card BACKBONE [...]``: every protocol whose data is present, for one or
more backbones, in one table.

An orchestrator over the protocols' own commands, not a re-implementation: config.py names the
protocols and builds each one's command line from the card's options, run.py plans (reuse a
matching result, or run it here or as one SLURM array through fastloc.launch) and gathers, and
render.py writes card.md, card.csv, card.json and card.png. Nothing is averaged across protocols.
"""
