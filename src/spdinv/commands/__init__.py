"""The subcommands of `spdinv`, one module each (`invert`, `edit`, `world`, `concept`, `bench`, `demo`), and
`common`: what they share (inversion flags, the model from `--model`, checks, prompt warnings). `cli` builds the
parser from them and runs the chosen one."""
