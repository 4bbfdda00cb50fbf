"""`python -m zsctl …` (what `accelerate launch -m zsctl …` runs)."""

from zsctl.cli import main

main()
