"""The CLI layer: `bidirlm` and every subcommand's entry point."""
