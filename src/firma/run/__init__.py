"""`firma run`: the one launch sequence (sequence.py) and the two ways of hosting its services,
forked.py (a forked services process serving sockets planted in the sandbox) and inprocess.py
(asyncio in this process, on host loopback); log.py, gates.py, envelope.py, record.py and
signals.py (supervision and teardown) serve both."""
