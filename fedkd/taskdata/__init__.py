"""Loaders of the centralized methods' datasets (time series, anomaly tables, audio, pairs).

Each module registers its datasets with `fedkd.data.register_task_dataset` on import; the
method module that needs a dataset imports its loader module.
"""
