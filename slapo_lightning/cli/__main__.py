"""``python -m slapo_lightning.cli`` is ``slapo-train``."""
from .train import main

main()
