"""Command-line tools: convert, bench (+ its workers), plot. Importing them sets nothing up."""
