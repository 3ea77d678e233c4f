"""The learning wing: from built records to a trained run folder.

Input pipelines, models and the product model's pooling, the fusion head, the duplicate
table, training, the run folder, the product predictor (the scoring rule of validation,
predict, evaluate and Beam), distribution over devices and hosts, runtime and backend
detection, the preflight. Imports only the settings, catalogue and prepare floors.
"""
