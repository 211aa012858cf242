"""Compression methods: one module each, and the registry that lists them.

`jcompress.methods.registry.METHODS` is the list; `jcompress.methods.base.Method` says what a
method declares. Importing this package imports no method module (the registry does).
"""
