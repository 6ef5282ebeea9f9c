"""`python -m attnaudit` runs the command line."""
from attnaudit.cli import main

main()
