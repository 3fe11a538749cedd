try:
    from .cli import run
except KeyboardInterrupt:  # Ctrl-C in the first half second: the same one line as during parsing
    import sys

    print("spdinv: interrupted while starting; nothing was done", file=sys.stderr)
    raise SystemExit(130) from None

run()
