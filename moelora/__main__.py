"""`python -m moelora train ...`, the form distributed launchers (accelerate, deepspeed) call."""

from moelora.cli import main

main()
