"""pgturso: keep Turso (libSQL) tables continuously equal to Postgres tables.

How a change flows, one module per step:

    capture.py    trigger SQL that packs changed rows into pgturso.outbox (runs in Postgres)
    outbox.py     the worker reads a commit-consistent batch of outbox events
    statements.py turns events into SQLite statements (one json_each statement per run of rows)
    hrana.py      encodes them as a Hrana pipeline request and reads the answer
    targets.py    sends them to Turso over HTTP or to a local file through pyturso
    progress.py   the marker on the target that makes delivery exactly-once
    pipeline.py   sends batch N on a thread while Postgres reads batch N+1
    worker.py     the loop: recover, read, send, mark delivered, wait for NOTIFY

The Postgres-to-SQLite type map (types.py) and identifier quoting (quoting.py) are used by all of them.
"""

__version__ = "0.7.0"
