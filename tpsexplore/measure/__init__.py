"""Measuring timm ViTs: throughput, GPU/CPU telemetry, environment records and other costs."""
