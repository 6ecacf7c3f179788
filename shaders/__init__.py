"""WGSL kernel templates, one per archetype (package data)."""
