"""What a person reads: one set of formatters; the terminal table, Markdown, HTML report, compare."""
