"""Arithmetic about models and runs: parameters, FLOPs, memory, time, energy and carbon."""
