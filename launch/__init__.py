"""SLURM launching with submitit (installed as ``fastloc.launch``)."""
