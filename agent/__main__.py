"""`python -m agent` is the same as the `nvidia-agent` command."""

from agent.cli import main

raise SystemExit(main())
