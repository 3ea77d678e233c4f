"""The catalogue wing: what a Cdiscount-format folder holds and how to read it safely.

BSON reading and validation, the offset index (and its Beam form), JPEG facts and the
image screen, problem lists, the taxonomy, the synthetic catalogue and the inspect
report; with the file helpers every later wing uses. Imports no Keras and no later wing.
"""
