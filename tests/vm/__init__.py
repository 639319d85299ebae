"""Vagrant/libvirt test hosts: box build, `scripts/vm up|down|status`, pytest fixtures.

Run from the repository root as `python -m tests.vm ...` (scripts/vm does that).
"""
