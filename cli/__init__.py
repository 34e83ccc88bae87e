"""The `pipeline` command line: parse, build a config, call the library, print. No torch here."""
