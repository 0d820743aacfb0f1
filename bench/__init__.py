"""Benchmarks against peer libraries on the same local Dovecot and Postfix."""
