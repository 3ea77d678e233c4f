"""The serving wing: from a run folder to an export, and from an export to answers.

The export format (write, load, checksums, graph check, signatures), exporting (from a
run, an ensemble, with the duplicate table weighed), batch inference locally and on
Beam (one entry: `inference.open_scoring`), scoring, pictures. Imports any earlier floor.
"""
