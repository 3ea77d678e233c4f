"""The learning wing: from built records to a trained run folder.

Input pipelines, models and the product head, the fusion head, the duplicate table,
training, the run folder, settings, distribution over devices and hosts, runtime and
backend detection. Imports only the catalogue and build wings.
"""
