"""Maintainer tools: not imported by the trainer."""
