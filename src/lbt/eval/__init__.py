"""Stance battery, capability checks and evaluation callbacks."""
