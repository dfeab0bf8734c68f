import sys

try:
    from .cli import main
except ModuleNotFoundError as missing:  # e.g. the background worker's python3 without python3-psycopg
    print(f"pgturso: cannot start: {missing}. Install it for {sys.executable} (Debian: apt-get install "
          "python3-psycopg python3-requests), or point pgturso.python at an interpreter that has it.",
          file=sys.stderr)
    sys.exit(2)

sys.exit(main())
