"""Shared pytest configuration.

Fixture modules live in ``tests/fakes`` (importable as ``fakes``).
"""
