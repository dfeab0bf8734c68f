"""How a worker's run ends (Worker.run, PatternWorker.run): the exit codes of ``pgturso-worker``."""

EXIT_OK, EXIT_RETRIES_EXHAUSTED, EXIT_FATAL, EXIT_LOCKED = 0, 1, 2, 3
