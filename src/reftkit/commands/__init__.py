"""The `reftkit` command line and what each command runs that is not a trainer."""
