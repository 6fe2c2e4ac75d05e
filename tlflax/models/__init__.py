"""Backbones (registry and variants), heads and weight importers."""
