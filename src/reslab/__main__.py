import sys

try:
    from reslab.cli import main
except KeyboardInterrupt:  # Ctrl-C while the CLI is still being imported: nothing has started
    print("reslab: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
