"""`python -m spdinv` and the `spdinv` console script: the command line, with Ctrl-C during its
imports answered by the same one line as Ctrl-C during parsing (this module imports nothing else
until `main` runs, so the console script reaches the handler at once)."""


def main() -> None:
    try:
        from .cli import run
    except KeyboardInterrupt:  # Ctrl-C while the command line's modules load
        import sys

        print("spdinv: interrupted while starting; nothing was done", file=sys.stderr)
        raise SystemExit(130) from None
    run()


if __name__ == "__main__":
    main()
