"""Datasets, device-resident batches, models and plug-ins: torch only, nothing from tracking or the applications."""
