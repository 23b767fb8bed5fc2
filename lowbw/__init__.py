"""lowbw: pipeline-parallel training across internet-linked nodes, measured.

Entry points: ``lowbw-train`` (lowbw/train.py). See README.md for the commands.
"""

__version__ = "0.1.0"
