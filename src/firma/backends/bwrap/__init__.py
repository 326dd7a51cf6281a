"""The bubblewrap backend (Linux): backend.py (BwrapBackend), facts.py (host facts for the pure
plan), child.py (the running sandbox), verify.py (checks from outside), planting.py (sockets in
the sandbox's network namespace), command.py (the command must exist inside)."""
