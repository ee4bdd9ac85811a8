"""`python -m engine <command>`: see engine/cli.py."""
from .cli import main

raise SystemExit(main())
